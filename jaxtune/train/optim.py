"""Optimizers and learning-rate schedules from config, built only from optax pieces.

`build_optimizer(cfg, total_steps)` returns ``(optax.GradientTransformation,
schedule)``: global-norm clipping, then AdamW / Adafactor / Lion with
decoupled weight decay masked off norms, biases and embeddings unless the
config asks for them. This module knows nothing of models or meshes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal, Optional

import jax
import optax

from jaxtune.quant.optim import adamw_8bit
from jaxtune.utils.tree import keypath_str


@dataclass(frozen=True)
class OptimConfig:
    name: Literal["adamw", "adamw8bit", "adafactor", "lion"] = "adamw"  # adamw8bit: 8-bit blockwise moments
    lr: float = 3e-4  # peak learning rate
    b1: Optional[float] = None  # default 0.9 (AdamW, Lion)
    b2: Optional[float] = None  # default 0.95 (AdamW), 0.99 (Lion)
    eps: Optional[float] = None  # default 1e-8 (AdamW)
    weight_decay: float = 0.0  # decoupled (AdamW-style); Adafactor/Lion scale it by the lr as optax does
    decay_norms: bool = False
    decay_biases: bool = False
    decay_embeddings: bool = False
    no_decay: tuple[str, ...] = ()  # further regexes over param paths exempt from weight decay
    clip_norm: Optional[float] = 1.0  # global gradient-norm clip; None = off
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = 0
    decay_steps: Optional[int] = None  # end of the decay; default: the run's total steps
    final_lr_ratio: float = 0.1  # lr at decay_steps = lr * final_lr_ratio (cosine, linear)
    min_8bit_size: int = 4096  # adamw8bit: parameters with fewer elements keep float32 moments

    def __post_init__(self):
        if self.lr <= 0:
            raise ValueError(f"optim.lr must be positive, got {self.lr}")
        if self.warmup_steps < 0:
            raise ValueError(f"optim.warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.clip_norm is not None and self.clip_norm <= 0:
            raise ValueError(f"optim.clip_norm must be positive or null, got {self.clip_norm}")
        if not 0.0 <= self.final_lr_ratio <= 1.0:
            raise ValueError(f"optim.final_lr_ratio must be in [0, 1], got {self.final_lr_ratio}")
        for pattern in self.no_decay:
            try:
                re.compile(pattern)
            except re.error as err:
                raise ValueError(f"optim.no_decay: bad regex {pattern!r}: {err}") from None


def build_schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to ``lr``, then cosine / linear decay to ``lr * final_lr_ratio`` or constant."""
    decay_steps = cfg.decay_steps or total_steps
    if cfg.schedule != "constant" and decay_steps <= cfg.warmup_steps:
        raise ValueError(
            f"optim: decay ends at step {decay_steps}, not after warmup ({cfg.warmup_steps} steps); "
            "set optim.decay_steps or train.steps higher, or optim.schedule=constant"
        )
    end = cfg.lr * cfg.final_lr_ratio
    if cfg.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, cfg.lr, cfg.warmup_steps, decay_steps, end)
    warmup = optax.linear_schedule(0.0, cfg.lr, cfg.warmup_steps)
    if cfg.schedule == "linear":
        after = optax.linear_schedule(cfg.lr, end, decay_steps - cfg.warmup_steps)
    elif cfg.schedule == "constant":
        after = optax.constant_schedule(cfg.lr)
    else:
        raise ValueError(f"optim.schedule: unknown schedule {cfg.schedule!r} (cosine | linear | constant)")
    if cfg.warmup_steps == 0:
        return after
    return optax.join_schedules([warmup, after], [cfg.warmup_steps])



def is_decayed(path: str, cfg: OptimConfig) -> bool:
    """Whether weight decay applies to the leaf at ``path`` (e.g. ``layers_0/attn/q_proj/kernel``)."""
    parts = path.split("/")
    if not cfg.decay_norms and any(p.endswith("norm") for p in parts):
        return False
    if not cfg.decay_biases and parts[-1] == "bias":
        return False
    if not cfg.decay_embeddings and any(p in ("embed", "pos_embed") for p in parts):
        return False
    return not any(re.search(pattern, path) for pattern in cfg.no_decay)


def decay_mask(params: Any, cfg: OptimConfig) -> Any:
    """A bool per array leaf: True where weight decay applies."""
    return jax.tree_util.tree_map_with_path(lambda p, _: is_decayed(keypath_str(p), cfg), params)


def build_optimizer(cfg: OptimConfig, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    schedule = build_schedule(cfg, total_steps)
    mask = lambda params: decay_mask(params, cfg)  # noqa: E731  (a callable, so it follows any trainable tree)
    pick = lambda value, default: default if value is None else value  # noqa: E731
    if cfg.name == "adamw":
        opt = optax.adamw(schedule, b1=pick(cfg.b1, 0.9), b2=pick(cfg.b2, 0.95), eps=pick(cfg.eps, 1e-8),
                          weight_decay=cfg.weight_decay, mask=mask)
    elif cfg.name == "adamw8bit":
        opt = adamw_8bit(schedule, b1=pick(cfg.b1, 0.9), b2=pick(cfg.b2, 0.95), eps=pick(cfg.eps, 1e-8),
                         weight_decay=cfg.weight_decay, mask=mask, min_8bit_size=cfg.min_8bit_size)
    elif cfg.name == "lion":
        if cfg.eps is not None:
            raise ValueError("optim.eps: Lion has no epsilon (sign update); leave it unset")
        opt = optax.lion(schedule, b1=pick(cfg.b1, 0.9), b2=pick(cfg.b2, 0.99), weight_decay=cfg.weight_decay, mask=mask)
    elif cfg.name == "adafactor":
        given = [k for k in ("b1", "b2", "eps") if getattr(cfg, k) is not None]
        if given:
            raise ValueError(f"optim.{given[0]}: Adafactor (optax defaults: factored second moment, decay rate 0.8) "
                             "does not take b1/b2/eps; leave them unset")
        opt = optax.adafactor(schedule, weight_decay_rate=cfg.weight_decay or None, weight_decay_mask=mask)
    else:
        raise ValueError(f"optim.name: unknown optimizer {cfg.name!r} (adamw | adamw8bit | adafactor | lion)")
    if cfg.clip_norm is not None:
        opt = optax.chain(optax.clip_by_global_norm(cfg.clip_norm), opt)
    return opt, schedule

"""LoRA as a transform of the parameter tree (DESIGN contracts 2-4).

``apply_lora(params, cfg, rng)`` replaces every kernel whose path matches ``cfg.targets``
with a `LoraWeight` (frozen base ``W: [in, out]``, trainable ``A: [in, r]`` and ``B: [r, out]``,
scale ``s``). The one linear op computes it factored, ``x @ W + s * (x @ A) @ B``, so
``W + s * A @ B`` is never materialised inside a model step. ``lora_mask`` marks A and B
trainable for `jaxtune.utils.partition.split`; ``merge`` folds the adapters into plain
kernels for inference; ``split_lora`` / ``join_lora`` take a tree apart into (base,
adapters) and put it back.

Scaling is ``alpha / r`` (``alpha / sqrt(r)`` with ``rslora``). Inits: ``default`` (A
Kaiming-uniform as in PEFT, B zero: the model is unchanged at step 0), ``gaussian`` (A ~
N(0, 1/r), B zero), ``pissa`` (A, B from the top-r singular triplets of W, the base replaced
by the residual, so base + s*A@B == W at step 0) and ``olora`` (from a QR decomposition of W,
likewise exact at step 0).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Literal

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from jaxtune.ops.linear import dropout, linear, register_linear
from jaxtune.parallel.rules import nested_specs, register_sharding
from jaxtune.peft.core import is_adapter, is_weight_leaf, merge_type, register_adapter
from jaxtune.quant.matmul import lora_over_quantized
from jaxtune.quant.weight import QuantizedWeight
from jaxtune.utils.targets import map_targets, target_patterns
from jaxtune.utils.tree import keypath_str

INITS = ("default", "gaussian", "pissa", "olora")


@register_adapter
@jax.tree_util.register_dataclass
@dataclass
class LoraWeight:
    """A LoRA-adapted kernel: ``x @ base + scale * (dropout(x) @ a) @ b``. ``scale`` and
    ``dropout`` (applied to the adapter's input in training steps only) are static metadata."""

    base: Any  # [in, out]
    a: Any  # [in, r]
    b: Any  # [r, out]
    scale: float = field(metadata=dict(static=True), default=1.0)
    dropout: float = field(metadata=dict(static=True), default=0.0)

    @property
    def rank(self) -> int:
        return self.a.shape[-1]

    def merged(self) -> jax.Array:
        """``base + scale * a @ b`` in the base's dtype (float32 accumulation)."""
        delta = jnp.matmul(self.a.astype(jnp.float32), self.b.astype(jnp.float32)) * self.scale
        return (self.base.astype(jnp.float32) + delta).astype(self.base.dtype)


@register_linear(LoraWeight)
def _lora_linear(x, w: LoraWeight, *, dtype, rng=None):
    h = dropout(x, w.dropout, rng)
    low_rank = lambda h, a, b: linear(linear(h, a, dtype=dtype), b, dtype=dtype)  # noqa: E731
    if isinstance(w.base, QuantizedWeight):  # QLoRA: one fused kernel where the quantized kernel takes that path
        return lora_over_quantized(x, h, w.base, w.a, w.b, w.scale, dtype, low_rank)
    return linear(x, w.base, dtype=dtype) + w.scale * low_rank(h, w.a, w.b)


@register_sharding(LoraWeight)
def _lora_specs(w: LoraWeight, spec: P) -> LoraWeight:
    """A follows the base's input axis, B its output axis; the rank dimension is replicated."""
    in_axis = spec[0] if len(spec) > 0 else None
    out_axis = spec[1] if len(spec) > 1 else None
    return LoraWeight(base=nested_specs(w.base, spec), a=P(in_axis, None), b=P(None, out_axis), scale=w.scale, dropout=w.dropout)


@dataclass(frozen=True)
class LoraConfig:
    """rank / alpha for every target; ``rank_pattern`` / ``alpha_pattern`` map a regex over the
    param path to another value (first match wins). ``targets``: preset names (attention,
    attention-qv, mlp, all-linear) or regexes over paths such as ``layers_3/attn/q_proj/kernel``."""

    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = ("attention",)
    rank_pattern: dict = field(default_factory=dict)
    alpha_pattern: dict = field(default_factory=dict)
    rslora: bool = False
    init: Literal["default", "gaussian", "pissa", "olora"] = "default"
    dropout: float = 0.0  # on the adapter input, training steps only
    dora: bool = False  # weight-decomposed LoRA (DoRA): `jaxtune.peft.dora.apply_dora` takes this config

    def __post_init__(self):
        if self.rank < 1:
            raise ValueError(f"lora.rank must be >= 1, got {self.rank}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora.dropout must be in [0, 1), got {self.dropout}")
        if self.init not in INITS:
            raise ValueError(f"lora.init: unknown init {self.init!r} ({' | '.join(INITS)})")
        target_patterns(self.targets, "lora.targets")
        for name, pattern in (("rank_pattern", self.rank_pattern), ("alpha_pattern", self.alpha_pattern)):
            for key, value in pattern.items():
                re.compile(key)
                if name == "rank_pattern" and (not isinstance(value, int) or value < 1):
                    raise ValueError(f"lora.rank_pattern[{key!r}] must be a positive integer, got {value!r}")

    def rank_and_scale(self, path: str) -> tuple[int, float]:
        rank = next((v for k, v in self.rank_pattern.items() if re.search(k, path)), self.rank)
        alpha = next((float(v) for k, v in self.alpha_pattern.items() if re.search(k, path)), float(self.alpha))
        return rank, alpha / (math.sqrt(rank) if self.rslora else rank)


def init_factors(kind: str, w: Any, rank: int, scale: float, key: jax.Array):
    """-> (base, a, b) for one kernel ``w: [in, out]`` (float32 maths, cast back to w's dtype).
    ``w`` may be quantized (QLoRA): default / gaussian keep it as it is; PiSSA / OLoRA work on its
    dequantized values and quantize the residual base again (exact at init up to that rounding)."""
    fan_in, fan_out = w.shape
    if rank > min(fan_in, fan_out) and kind in ("pissa", "olora"):
        raise ValueError(f"{kind} needs rank <= min(in, out) = {min(fan_in, fan_out)}, got {rank}")
    w32 = w.astype(jnp.float32)
    if kind == "default":  # torch's kaiming_uniform_(a=sqrt(5)) on A, as PEFT: U(-1/sqrt(in), 1/sqrt(in))
        bound = 1.0 / math.sqrt(fan_in)
        a = jax.random.uniform(key, (fan_in, rank), jnp.float32, -bound, bound)
        b = jnp.zeros((rank, fan_out), jnp.float32)
        base = w32
    elif kind == "gaussian":
        a = jax.random.normal(key, (fan_in, rank), jnp.float32) / rank
        b = jnp.zeros((rank, fan_out), jnp.float32)
        base = w32
    elif kind == "pissa":  # W = U S Vt; s*A@B carries the top-r part, the base the rest
        u, s, vt = jnp.linalg.svd(w32, full_matrices=False)
        root = jnp.sqrt(s[:rank] / scale)
        a = u[:, :rank] * root[None, :]
        b = root[:, None] * vt[:rank]
        base = w32 - scale * a @ b
    else:  # olora: QR of the PEFT-layout weight [out, in]: B^T = Q_r, A^T = R_r
        q, r = jnp.linalg.qr(w32.T)
        b = q[:, :rank].T
        a = r[:rank].T
        base = w32 - scale * a @ b
    dtype = w.dtype
    if kind in ("default", "gaussian"):
        base = w  # untouched (a quantized base stays quantized)
    elif hasattr(w, "requantize"):  # a quantized base: the residual is quantized again with its settings
        base = w.requantize(base)
    else:
        base = base.astype(dtype)
    return base, a.astype(dtype), b.astype(dtype)


def apply_lora(params: Any, cfg: LoraConfig, rng: jax.Array) -> Any:
    """A new tree with every targeted kernel replaced by a `LoraWeight` (others untouched).
    Raises if no path matches, or a target is already adapted."""
    keys = iter(jax.random.split(rng, max(1, len(jax.tree.leaves(params)))))

    def adapt(where, leaf):
        if isinstance(leaf, LoraWeight):
            raise ValueError(f"lora: {where} already has a LoRA adapter")
        if is_adapter(leaf):
            raise ValueError(f"lora: {where} already has an adapter ({type(leaf).__name__})")
        if getattr(leaf, "ndim", None) != 2:
            raise ValueError(f"lora: target {where} is not a 2-D kernel (shape {getattr(leaf, 'shape', None)})")
        rank, scale = cfg.rank_and_scale(where)
        base, a, b = init_factors(cfg.init, leaf, rank, scale, next(keys))
        return LoraWeight(base=base, a=a, b=b, scale=scale, dropout=cfg.dropout)

    return map_targets(params, cfg.targets, adapt, key="lora.targets", is_leaf=is_weight_leaf)


def _is_lora(x) -> bool:
    return isinstance(x, LoraWeight)


def lora_mask(params: Any) -> Any:
    """Per-array trainable mask: LoRA A and B True, everything else (bases included) False."""
    def mark(x):
        if isinstance(x, LoraWeight):
            return LoraWeight(base=False, a=True, b=True, scale=x.scale, dropout=x.dropout)
        return False

    return jax.tree.map(mark, params, is_leaf=_is_lora)


def merge(params: Any) -> Any:
    """Every `LoraWeight` folded into a plain kernel ``base + s*A@B`` (no extra latency)."""
    return merge_type(params, LoraWeight)


def split_lora(params: Any) -> tuple[Any, dict[str, dict]]:
    """-> (base params with plain kernels, {path: {"a", "b", "scale"}}): the adapters alone."""
    adapters: dict[str, dict] = {}

    def take(path, x):
        if isinstance(x, LoraWeight):
            adapters[keypath_str(path)] = {"a": x.a, "b": x.b, "scale": x.scale, "dropout": x.dropout}
            return x.base
        return x

    base = jax.tree_util.tree_map_with_path(take, params, is_leaf=_is_lora)
    return base, adapters


def join_lora(base: Any, adapters: dict[str, dict]) -> Any:
    """Inverse of `split_lora`: put adapters back onto the kernels at their paths."""
    left = dict(adapters)

    def put(path, x):
        where = keypath_str(path)
        if where not in left:
            return x
        ad = left.pop(where)
        if ad["a"].shape[0] != x.shape[0] or ad["b"].shape[1] != x.shape[1]:
            raise ValueError(f"lora adapter for {where}: A {ad['a'].shape} / B {ad['b'].shape} do not fit "
                             f"the kernel {x.shape}")
        return LoraWeight(base=x, a=ad["a"], b=ad["b"], scale=ad["scale"], dropout=ad.get("dropout", 0.0))

    out = jax.tree_util.tree_map_with_path(put, base)
    if left:
        raise ValueError(f"lora adapters for paths not in the model: {sorted(left)[:5]}")
    return out

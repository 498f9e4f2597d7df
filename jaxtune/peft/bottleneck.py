"""Bottleneck adapters (Houlsby et al., 2019; Pfeiffer et al., 2021) as adapter leaves.

A bottleneck adapter is a small residual MLP on a sublayer's output, before that output is added
back to the residual stream:

    h   = sublayer output, after its projection back to the model width (bias included)
    out = h + scale * dropout(up(act(down(h))))        down: [embed, size], up: [size, embed]

**Houlsby** puts one after the attention output projection (``attn/o_proj``) and one after the
MLP's down projection (``mlp/down_proj``); **Pfeiffer** after the MLP only. Here the adapter is
a typed leaf, `BottleneckWeight`, that replaces those kernels, so the model code does not change:
the one linear op computes ``h = linear(x, base)`` and returns ``h + adapter(h)``, which is
exactly the adapter on the sublayer output (dropout on the adapter branch, as AdapterHub does).
``up`` starts at zero, so the model is unchanged at step 0; ``down`` ~ N(0, init_std^2), by
default ``1 / sqrt(embed)`` (variance-preserving; Houlsby used 1e-2).

**Layers with a bias** (GPT-2: ``o_bias`` / ``mlp_bias``). Our ``Linear`` adds its own bias
*after* the linear op returns, so an adapter that only wrapped the kernel would see ``x @ W``
instead of the sublayer output ``x @ W + b`` that the paper (and AdapterHub) feeds it.
`apply_bottleneck` therefore moves that bias into the frozen base (a `KernelWithBias`, whose
rule adds it) and leaves zeros in the layer's ``bias`` leaf: the adapter sees the biased output,
the model is unchanged at step 0, and `jaxtune.peft.core.base_model` (adapters off) still
computes the original layer. `remove_bottleneck` undoes it exactly (the layer's bias becomes
the moved bias plus whatever the ``bias`` leaf holds, e.g. after BitFit).

Unlike LoRA, an adapter with a nonlinearity cannot be merged into the kernel: it stays in the
tree for inference (two small matmuls per adapted layer). BitFit after `apply_bottleneck` trains
the zeroed ``bias`` leaf, i.e. a bias added after the adapter; the moved bias stays frozen.

This module must not touch leaves other than the targeted kernels and their own ``bias`` leaves,
and needs no change to the model code.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from jaxtune.ops.linear import dropout, linear, register_linear
from jaxtune.parallel.rules import nested_specs, register_sharding
from jaxtune.peft.core import is_weight_leaf, register_adapter
from jaxtune.peft.selective import kernel_features, out_axis
from jaxtune.utils.targets import map_targets, target_patterns
from jaxtune.utils.tree import keypath_str

PLACEMENTS = {
    "houlsby": (r"attn/o_proj/kernel$", r"mlp/down_proj/kernel$"),
    "pfeiffer": (r"mlp/down_proj/kernel$",),
}
ACTIVATIONS = {
    "relu": jax.nn.relu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "silu": jax.nn.silu,
    "tanh": jnp.tanh,
    "identity": lambda x: x,
}


@jax.tree_util.register_dataclass
@dataclass
class KernelWithBias:
    """A frozen kernel carrying the layer bias that `apply_bottleneck` moved in:
    ``linear(x, kernel) + bias``. Not an adapter: nothing in it is trainable, and
    `jaxtune.peft.core.base_model` keeps it (it is the original layer)."""

    kernel: Any  # [in, out] or a typed leaf
    bias: Any  # [out]


@register_linear(KernelWithBias)
def _kernel_with_bias_linear(x, w: KernelWithBias, *, dtype, rng=None):
    y = linear(x, w.kernel, dtype=dtype, rng=rng)
    return y + w.bias.astype(y.dtype)


@register_sharding(KernelWithBias)
def _kernel_with_bias_specs(w: KernelWithBias, spec: P) -> KernelWithBias:
    return KernelWithBias(kernel=nested_specs(w.kernel, spec), bias=P(out_axis(spec)))


@register_adapter
@jax.tree_util.register_dataclass
@dataclass
class BottleneckWeight:
    """``h = linear(x, base)``; ``h + scale * dropout(act(h @ down + down_bias) @ up + up_bias)``.
    base: [in, out] (or typed); down: [out, size]; down_bias: [size]; up: [size, out];
    up_bias: [out]. ``activation``, ``dropout`` and ``scale`` are static."""

    base: Any
    down: Any
    down_bias: Any
    up: Any
    up_bias: Any
    activation: str = field(metadata=dict(static=True), default="relu")
    dropout: float = field(metadata=dict(static=True), default=0.0)
    scale: float = field(metadata=dict(static=True), default=1.0)

    @property
    def size(self) -> int:
        return self.down.shape[-1]


@register_linear(BottleneckWeight)
def _bottleneck_linear(x, w: BottleneckWeight, *, dtype, rng=None):
    base_rng, drop_rng = (None, None) if rng is None else jax.random.split(rng)
    h = linear(x, w.base, dtype=dtype, rng=base_rng)  # [..., out]: the sublayer output
    z = ACTIVATIONS[w.activation](linear(h, w.down, dtype=dtype) + w.down_bias.astype(h.dtype))
    delta = linear(z, w.up, dtype=dtype) + w.up_bias.astype(h.dtype)
    return h + w.scale * dropout(delta, w.dropout, drop_rng)


@register_sharding(BottleneckWeight)
def _bottleneck_specs(w: BottleneckWeight, spec: P) -> BottleneckWeight:
    """down's input and up's output follow the base's output axis; the bottleneck is replicated."""
    out = out_axis(spec)
    return BottleneckWeight(base=nested_specs(w.base, spec), down=P(out, None), down_bias=P(),
                            up=P(None, out), up_bias=P(out), activation=w.activation, dropout=w.dropout,
                            scale=w.scale)


@dataclass(frozen=True)
class BottleneckConfig:
    """``placement``: houlsby (attention output and MLP output) | pfeiffer (MLP output only);
    ``targets``: regexes over kernel paths instead of the placement's. ``size``: bottleneck width;
    ``init_std``: std of ``down`` (None: 1/sqrt(embed)); ``scale`` multiplies the adapter branch."""

    placement: Literal["houlsby", "pfeiffer"] = "houlsby"
    size: int = 64
    activation: str = "relu"
    dropout: float = 0.0  # on the adapter branch, training steps only
    scale: float = 1.0
    init_std: Optional[float] = None
    targets: Optional[tuple[str, ...]] = None

    def __post_init__(self):
        if self.placement not in PLACEMENTS:
            raise ValueError(f"bottleneck.placement: unknown {self.placement!r} ({' | '.join(PLACEMENTS)})")
        if self.size < 1:
            raise ValueError(f"bottleneck.size must be >= 1, got {self.size}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"bottleneck.activation: unknown {self.activation!r} ({' | '.join(ACTIVATIONS)})")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"bottleneck.dropout must be in [0, 1), got {self.dropout}")
        if self.init_std is not None and self.init_std <= 0:
            raise ValueError(f"bottleneck.init_std must be > 0, got {self.init_std}")
        target_patterns(self.target_list, "bottleneck.targets")

    @property
    def target_list(self) -> tuple[str, ...]:
        return self.targets if self.targets is not None else PLACEMENTS[self.placement]


def _prefix(path: str) -> str:
    return path.rsplit("/", 1)[0]


def apply_bottleneck(params: Any, cfg: BottleneckConfig, rng: jax.Array) -> Any:
    """A new tree with each targeted kernel replaced by a `BottleneckWeight` (identity at init).
    A layer bias next to a targeted kernel moves into its frozen base (see the module doc).
    Raises if nothing matches or a target already has a bottleneck adapter."""
    flat = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_weight_leaf)[0]
    leaves = {keypath_str(p): x for p, x in flat}
    adapted: list[str] = []

    def adapt(where, leaf):
        if isinstance(leaf, BottleneckWeight):
            raise ValueError(f"bottleneck: {where} already has a bottleneck adapter")
        if isinstance(leaf, jax.Array) and leaf.ndim != 2:
            raise ValueError(f"bottleneck: target {where} is not a 2-D kernel (shape {leaf.shape})")
        out, dtype = kernel_features(leaf)
        std = cfg.init_std if cfg.init_std is not None else 1.0 / math.sqrt(out)
        key = jax.random.fold_in(rng, len(adapted))
        adapted.append(where)
        base = leaf
        bias = leaves.get(_prefix(where) + "/bias")
        if bias is not None:
            base = KernelWithBias(kernel=leaf, bias=bias)
        return BottleneckWeight(
            base=base,
            down=(std * jax.random.normal(key, (out, cfg.size), jnp.float32)).astype(dtype),
            down_bias=jnp.zeros((cfg.size,), dtype),
            up=jnp.zeros((cfg.size, out), dtype),
            up_bias=jnp.zeros((out,), dtype),
            activation=cfg.activation, dropout=cfg.dropout, scale=cfg.scale,
        )

    out = map_targets(params, cfg.target_list, adapt, key="bottleneck.targets", is_leaf=is_weight_leaf)
    moved = {_prefix(w) + "/bias" for w in adapted}
    return jax.tree_util.tree_map_with_path(
        lambda p, x: jnp.zeros_like(x) if keypath_str(p) in moved else x, out, is_leaf=is_weight_leaf)


def remove_bottleneck(params: Any) -> Any:
    """Inverse of `apply_bottleneck`: every `BottleneckWeight` back to its base kernel, a moved
    bias back into the layer's ``bias`` leaf (added to what that leaf holds now)."""
    moved: dict[str, Any] = {}

    def strip(path, leaf):
        if not isinstance(leaf, BottleneckWeight):
            return leaf
        base = leaf.base
        if isinstance(base, KernelWithBias):
            moved[_prefix(keypath_str(path)) + "/bias"] = base.bias
            base = base.kernel
        return base

    out = jax.tree_util.tree_map_with_path(strip, params, is_leaf=lambda x: isinstance(x, BottleneckWeight))

    def restore(path, leaf):
        where = keypath_str(path)
        if where not in moved:
            return leaf
        return (moved.pop(where).astype(jnp.float32) + leaf.astype(jnp.float32)).astype(leaf.dtype)

    out = jax.tree_util.tree_map_with_path(restore, out, is_leaf=is_weight_leaf)
    if moved:
        raise ValueError(f"remove_bottleneck: no bias leaf to take the moved bias back: {sorted(moved)[:5]}")
    return out

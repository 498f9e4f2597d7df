"""(IA)^3 (Liu et al., 2022) as a transform of the parameter tree.

``apply_ia3(params, IA3Config(...))`` replaces every targeted kernel with an `IA3Weight`: the
frozen base ``W: [in, out]`` and one trainable vector ``l`` that rescales features, as PEFT's
``IA3Layer``:

- feed-forward targets (``cfg.feedforward``; PEFT's ``feedforward_modules``) scale the *input*:
  ``y = (x * l) @ W`` with ``l: [in]``;
- all other targets scale the *output*: ``y = (x @ W) * l`` with ``l: [out]``.

``l`` starts at ones, so the model is unchanged at step 0. The defaults are PEFT's for Llama
(``k_proj``, ``v_proj``, ``down_proj``; ``down_proj`` feed-forward); `IA3Config.peft_default`
gives PEFT's defaults for the other supported families (Qwen2/3: q, v, down; GPT-2: its fused
``c_attn``, i.e. q, k and v here, and ``mlp.c_proj`` = down, feed-forward).

Bias: in jaxtune the layer bias is added by the model after the linear op, so an output-scaled
target computes ``(x @ W) * l + bias``. PEFT scales the biased result, ``(x @ W + bias) * l``.
The two agree on bias-free layers (Llama, Mistral, Qwen3, every feed-forward target); for an
output-scaled layer with a bias (Qwen2's k/v, GPT-2's c_attn) a model trained here leaves its
bias unscaled. `jaxtune.interop.peft_adapters.load_peft_adapter` imports PEFT IA3 adapters on
such layers exactly by folding ``l`` into the (frozen) bias leaf.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Optional

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from jaxtune.ops.linear import linear, register_linear
from jaxtune.parallel.rules import nested_specs, register_sharding
from jaxtune.peft.core import is_adapter, is_weight_leaf, merge_type, register_adapter
from jaxtune.utils.targets import map_targets, target_patterns

_KV_DOWN = (r"attn/(k|v)_proj/kernel$", r"mlp/down_proj/kernel$")
_QV_DOWN = (r"attn/(q|v)_proj/kernel$", r"mlp/down_proj/kernel$")
_FEEDFORWARD = (r"mlp/down_proj/kernel$",)
# PEFT's TRANSFORMERS_MODELS_TO_IA3_{TARGET,FEEDFORWARD}_MODULES_MAPPING, in jaxtune paths.
PEFT_DEFAULTS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "llama": (_KV_DOWN, _FEEDFORWARD),
    "mistral": (_KV_DOWN, _FEEDFORWARD),
    "qwen2": (_QV_DOWN, _FEEDFORWARD),
    "qwen3": (_QV_DOWN, _FEEDFORWARD),
    "gpt2": ((r"attn/(q|k|v)_proj/kernel$", r"mlp/down_proj/kernel$"), _FEEDFORWARD),  # c_attn, mlp.c_proj
}


@register_adapter
@jax.tree_util.register_dataclass
@dataclass
class IA3Weight:
    """An (IA)^3-adapted kernel: ``(x * scale_vec) @ base`` if ``on_input`` (``scale_vec: [in]``),
    else ``(x @ base) * scale_vec`` (``scale_vec: [out]``). ``on_input`` is static metadata."""

    base: Any  # [in, out]
    scale_vec: Any  # [in] if on_input else [out]
    on_input: bool = field(metadata=dict(static=True), default=False)

    def merged(self) -> jax.Array:
        """The plain kernel: base rows (``on_input``) or columns scaled, in the base's dtype."""
        w = self.base.astype(jnp.float32)
        vec = self.scale_vec.astype(jnp.float32)
        out = w * vec[:, None] if self.on_input else w * vec[None, :]
        return out.astype(self.base.dtype)


@register_linear(IA3Weight)
def _ia3_linear(x, w: IA3Weight, *, dtype, rng=None):
    dtype = x.dtype if dtype is None else dtype
    vec = w.scale_vec.astype(dtype)
    if w.on_input:
        return linear(x.astype(dtype) * vec, w.base, dtype=dtype, rng=rng)
    return linear(x, w.base, dtype=dtype, rng=rng) * vec


@register_sharding(IA3Weight)
def _ia3_specs(w: IA3Weight, spec: P) -> IA3Weight:
    """The vector follows the base's input axis (``on_input``) or its output axis."""
    axis = 0 if w.on_input else 1
    return IA3Weight(base=nested_specs(w.base, spec), scale_vec=P(spec[axis] if len(spec) > axis else None), on_input=w.on_input)


@dataclass(frozen=True)
class IA3Config:
    """``targets``: regexes over kernel paths (or `TARGET_PRESETS` names); ``feedforward``:
    regexes selecting which targets scale their input (the rest scale their output); each must
    match a targeted kernel. None (the default) means the MLP down projection where targeted."""

    targets: tuple[str, ...] = _KV_DOWN
    feedforward: Optional[tuple[str, ...]] = None  # None: the MLP down projection, wherever targeted

    def __post_init__(self):
        for name in ("targets", "feedforward"):
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, str):
                raise TypeError(f"ia3.{name} must be a list of patterns, got the string {value!r}")
            object.__setattr__(self, name, tuple(value))
            target_patterns(value, f"ia3.{name}")

    @classmethod
    def peft_default(cls, family: str) -> "IA3Config":
        """PEFT's default IA3 targets for a model family (llama, mistral, qwen2, qwen3, gpt2)."""
        if family not in PEFT_DEFAULTS:
            raise ValueError(f"ia3: no PEFT default targets for family {family!r}; known: {', '.join(PEFT_DEFAULTS)}")
        targets, feedforward = PEFT_DEFAULTS[family]
        return cls(targets=targets, feedforward=feedforward)

    def feedforward_patterns(self) -> list[re.Pattern]:
        return target_patterns(_FEEDFORWARD if self.feedforward is None else self.feedforward, "ia3.feedforward")


def apply_ia3(params: Any, cfg: IA3Config = IA3Config(), rng: Optional[jax.Array] = None) -> Any:
    """A new tree with every targeted kernel replaced by an `IA3Weight` with its vector at ones.
    ``rng`` is unused (the init is deterministic) and accepted for a uniform transform signature.
    Raises if no path matches, a target already carries an adapter, or a feed-forward pattern
    matches none of the targeted kernels."""
    del rng
    feedforward = cfg.feedforward_patterns()
    ff_used = [False] * len(feedforward)

    def adapt(where, leaf):
        if is_adapter(leaf):
            raise ValueError(f"ia3: {where} already has an adapter ({type(leaf).__name__})")
        if getattr(leaf, "ndim", None) != 2:
            raise ValueError(f"ia3: target {where} is not a 2-D kernel (shape {getattr(leaf, 'shape', None)})")
        hits = [i for i, p in enumerate(feedforward) if p.search(where)]
        for i in hits:
            ff_used[i] = True
        on_input = bool(hits)
        size = leaf.shape[0] if on_input else leaf.shape[1]
        return IA3Weight(base=leaf, scale_vec=jnp.ones((size,), leaf.dtype), on_input=on_input)

    out = map_targets(params, cfg.targets, adapt, key="ia3.targets", is_leaf=is_weight_leaf)
    unused = [p.pattern for p, used in zip(feedforward, ff_used) if not used] if cfg.feedforward is not None else []
    if unused:
        raise ValueError(f"ia3.feedforward patterns {unused} match none of the targeted kernels "
                         f"(feed-forward modules must be a subset of the targets, as in PEFT)")
    return out


def merge_ia3(params: Any) -> Any:
    """Every `IA3Weight` folded into its plain kernel (other leaves untouched)."""
    return merge_type(params, IA3Weight)

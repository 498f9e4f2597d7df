"""Selective PEFT: train a chosen subset of the weights a model already has.

- **BitFit** (Ben Zaken et al., 2021): train every bias, freeze the rest. `bitfit_mask(params)`
  marks the bias leaves (``layers_0/attn/q_proj/bias``; LayerNorm biases too, as in the paper,
  unless ``norms=False``).
- **LN-tuning** (Zhao et al., 2023; PEFT's ``LNTuningConfig``): train the norm layers.
  `ln_tuning_mask(params)` marks norm scales and biases (``attn_norm``, ``mlp_norm``,
  ``final_norm``, ``q_norm``, ``k_norm``; any ``*norm*`` module, so Flax's ``LayerNorm_0``
  in a foreign tree counts as well).

Both are masks (DESIGN contract 3): the tree is not changed, only which arrays
`jaxtune.peft.core.trainable_mask` (and so `jaxtune.utils.partition.split`) marks. Pass them
as extra masks: ``trainable_mask(params, bitfit_mask(params))``. The ``base`` of an adapter
leaf is frozen by definition, so arrays inside one are never marked.

A Llama-style model has no biases, so BitFit has nothing to train. `add_biases(params)` gives
it some: each targeted kernel becomes a `BiasedWeight` (frozen kernel, trainable bias of zeros,
``y = linear(x, base) + bias``), an adapter leaf like LoRA's, exactly the identity at step 0.
Our ``Linear`` adds a bias parameter of its own only when the `ModelConfig` says so, so a
`BiasedWeight` cannot fold into a plain kernel; `merge_biases` instead moves each bias out to a
sibling ``bias`` leaf, which a config with the matching ``qkv_bias`` / ``o_bias`` / ``mlp_bias``
flags then reads (a Llama with ``attention_bias`` and ``mlp_bias`` in Hugging Face terms).

This module must not change leaves it does not target, and never marks a leaf silently: a mask
that matches nothing is an error that says what to do instead.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from jaxtune.ops.linear import linear, register_linear
from jaxtune.parallel.rules import nested_specs, register_sharding
from jaxtune.peft.core import is_weight_leaf, register_adapter
from jaxtune.utils.targets import Targets, map_targets
from jaxtune.utils.tree import keypath_str

BIAS_PATTERN = r"(^|/)bias$"
NORM_BIAS_PATTERN = r"(?i)(^|/)[^/]*norm[^/]*/bias$"
NORM_PATTERN = r"(?i)(^|/)[^/]*norm[^/]*/(scale|bias)$"

# --- masks -----------------------------------------------------------------------------------


def _inside_base(path) -> bool:
    """True for a key path that passes through an adapter leaf's frozen ``base`` field."""
    return any(isinstance(k, jax.tree_util.GetAttrKey) and k.name == "base" for k in path)


def path_mask(params: Any, include: str, exclude: str | None = None) -> Any:
    """True for array leaves whose path (``a/b/c``) matches ``include`` and not ``exclude``;
    arrays inside an adapter's ``base`` are never marked. Same structure as ``params``."""
    inc = re.compile(include)
    exc = re.compile(exclude) if exclude else None

    def mark(path, _):
        if _inside_base(path):
            return False
        where = keypath_str(path)
        return bool(inc.search(where)) and not (exc is not None and exc.search(where))

    return jax.tree_util.tree_map_with_path(mark, params)


def _marked(mask: Any) -> int:
    return sum(bool(m) for m in jax.tree.leaves(mask))


def bitfit_mask(params: Any, *, norms: bool = True) -> Any:
    """BitFit: True for every bias leaf (``.../bias``, the biases `add_biases` added included);
    ``norms=False`` leaves out the norm layers' biases. Raises if the tree has no bias."""
    mask = path_mask(params, BIAS_PATTERN, None if norms else NORM_BIAS_PATTERN)
    if not _marked(mask):
        raise ValueError(
            "bitfit: this tree has no bias parameters to train (a Llama-style model has none: "
            "qkv_bias = o_bias = mlp_bias = False, RMSNorm without bias). Add zero biases as "
            "trainable adapter leaves first: params = jaxtune.peft.selective.add_biases(params), "
            "then train with jaxtune.peft.core.trainable_mask(params)"
        )
    return mask


def ln_tuning_mask(params: Any) -> Any:
    """LN-tuning: True for norm scales and biases (attn_norm, mlp_norm, final_norm, q_norm,
    k_norm: any module whose name contains ``norm``). Raises if the tree has none."""
    mask = path_mask(params, NORM_PATTERN)
    if not _marked(mask):
        raise ValueError("ln_tuning: no norm parameters in this tree (expected paths like "
                         "layers_0/attn_norm/scale or final_norm/bias)")
    return mask


# --- BitFit on bias-free models: BiasedWeight ------------------------------------------------


@register_adapter
@jax.tree_util.register_dataclass
@dataclass
class BiasedWeight:
    """A kernel with an added trainable bias: ``linear(x, base) + bias``.
    base: [in, out] (or any typed leaf, e.g. quantized or LoRA); bias: [out]."""

    base: Any
    bias: Any


@register_linear(BiasedWeight)
def _biased_linear(x, w: BiasedWeight, *, dtype, rng=None):
    y = linear(x, w.base, dtype=dtype, rng=rng)
    return y + w.bias.astype(y.dtype)  # as `Linear` adds its own bias


def out_axis(spec: P) -> Any:
    """The mesh axis of a kernel spec's output dimension (None if replicated)."""
    return spec[1] if len(spec) > 1 else None


@register_sharding(BiasedWeight)
def _biased_specs(w: BiasedWeight, spec: P) -> BiasedWeight:
    """The bias follows the base kernel's output axis."""
    return BiasedWeight(base=nested_specs(w.base, spec), bias=P(out_axis(spec)))


def kernel_features(leaf: Any) -> tuple[int, Any]:
    """-> (output features, dtype) of a kernel leaf, plain ``[in, out]`` or typed (found on its
    ``shape``/``dtype`` or, for adapters, on their ``base``)."""
    node = leaf
    while True:
        shape, dtype = getattr(node, "shape", None), getattr(node, "dtype", None)
        if shape is not None and dtype is not None:
            return int(shape[-1]), jnp.dtype(dtype)
        if not hasattr(node, "base"):
            raise TypeError(f"cannot tell the output size of a {type(leaf).__name__} kernel")
        node = node.base


def _paths(params: Any) -> set[str]:
    return {keypath_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(params, is_leaf=is_weight_leaf)[0]}


def add_biases(params: Any, targets: Targets = ("all-linear",)) -> Any:
    """A new tree with each targeted kernel that has no bias of its own wrapped in a
    `BiasedWeight` with a zero bias (the model's outputs are unchanged, exactly).

    ``targets``: presets (attention, mlp, all-linear, ...) or regexes over kernel paths.
    Kernels whose layer already has a ``bias`` leaf are left alone: `bitfit_mask` trains those
    biases directly. Raises if nothing was added.
    """
    paths = _paths(params)
    added, existing = [], []

    def adapt(where, leaf):
        if isinstance(leaf, BiasedWeight):
            raise ValueError(f"add_biases: {where} already has an added bias")
        if isinstance(leaf, jax.Array) and leaf.ndim != 2:
            raise ValueError(f"add_biases: target {where} is not a 2-D kernel (shape {leaf.shape})")
        if where.rsplit("/", 1)[0] + "/bias" in paths:
            existing.append(where)
            return leaf
        features, dtype = kernel_features(leaf)
        added.append(where)
        return BiasedWeight(base=leaf, bias=jnp.zeros((features,), dtype))

    out = map_targets(params, targets, adapt, key="add_biases: targets", is_leaf=is_weight_leaf, what="kernel")
    if not added:
        raise ValueError(f"add_biases: every targeted kernel already has a bias ({len(existing)}, e.g. "
                         f"{existing[0]}); train those with bitfit_mask(params)")
    return out


def merge_biases(params: Any) -> Any:
    """Each `BiasedWeight` at ``.../kernel`` becomes its base kernel plus a sibling ``.../bias``
    leaf (added to one already there). Apply the result with a `ModelConfig` whose
    ``qkv_bias`` / ``o_bias`` / ``mlp_bias`` flags cover every layer that now has a bias: our
    ``Linear`` reads a ``bias`` only when its config declares one."""

    def walk(node, path):
        if not isinstance(node, dict):
            if isinstance(node, BiasedWeight):
                raise ValueError(f"merge_biases: a BiasedWeight at {'/'.join(path)} is not under a 'kernel' key")
            return node
        out = {k: walk(v, path + (str(k),)) for k, v in node.items() if not isinstance(v, BiasedWeight)}
        for k, v in node.items():
            if isinstance(v, BiasedWeight):
                if k != "kernel":
                    raise ValueError(f"merge_biases: a BiasedWeight at {'/'.join(path + (str(k),))} "
                                     "is not under a 'kernel' key")
                out[k] = v.base
                bias = v.bias if "bias" not in node else node["bias"] + v.bias.astype(node["bias"].dtype)
                out["bias"] = bias
        return out

    return walk(params, ())

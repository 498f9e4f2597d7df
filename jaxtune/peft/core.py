"""What every PEFT method shares: adapter leaves, added subtrees, the trainable mask, counts.

A PEFT method changes the param tree in one of three ways (DESIGN contract 3):

- **adapter leaves**: a kernel is replaced by a registered typed leaf (`register_adapter`)
  that keeps the original under its ``base`` field and adds its own arrays (LoRA's A/B,
  DoRA's magnitude, IA3's scaling vector, a bottleneck adapter). Everything outside
  ``base`` is trainable; ``base`` stays frozen (it may itself be typed, e.g. quantized).
- **added subtrees**: top-level keys in `ADDED_KEYS` (``prompt`` for prompt tuning and
  P-tuning, ``prefix`` for prefix tuning) are trainable as a whole; the model reads them.
- **masks** over existing leaves (BitFit's biases, LN-tuning's norm scales): no change to
  the tree, only to which leaves `trainable_mask` marks.

`trainable_mask` gives the per-array mask that `jaxtune.utils.partition.split` takes;
`base_model` is the adapter-free view of a tree (the same arrays, no copy), which is what
"disable adapters" means and what DPO/PPO use as their reference model.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any, Iterable

import jax
import jax.numpy as jnp

from jaxtune.ops.linear import is_typed_weight
from jaxtune.quant.weight import is_quantized, quantize_kernel, quantized_paths
from jaxtune.utils.partition import any_mask, param_count
from jaxtune.utils.tree import keypath_str

ADDED_KEYS = ("prompt", "prefix")
_ADAPTER_TYPES: list[type] = []


def register_adapter(cls: type) -> type:
    """Mark a registered-dataclass leaf type as an adapter: it has a frozen ``base`` field and
    every other array field is trainable. Use as a class decorator (after the pytree registration)."""
    if not any(f.name == "base" for f in dataclasses.fields(cls)):
        raise TypeError(f"adapter leaf {cls.__qualname__} needs a 'base' field")
    if cls not in _ADAPTER_TYPES:
        _ADAPTER_TYPES.append(cls)
    return cls


def is_adapter(x: Any) -> bool:
    return isinstance(x, tuple(_ADAPTER_TYPES))


def is_weight_leaf(x: Any) -> bool:
    """Where a walk over kernels stops: an adapter leaf or a quantized kernel (a QLoRA base is
    both: an adapter whose base is quantized). Plain arrays are leaves anyway."""
    return is_adapter(x) or is_quantized(x)


def _mask_of_adapter(leaf: Any) -> Any:
    mask = jax.tree.map(lambda _: True, leaf)
    return dataclasses.replace(mask, base=jax.tree.map(lambda _: False, leaf.base))


def adapter_mask(params: Any) -> Any:
    """True for the arrays PEFT added (adapter fields outside ``base``; `ADDED_KEYS` subtrees)."""
    marked = jax.tree.map(lambda x: _mask_of_adapter(x) if is_adapter(x) else False, params, is_leaf=is_adapter)
    if isinstance(params, dict):
        for key in ADDED_KEYS:
            if key in params:
                marked[key] = jax.tree.map(lambda _: True, params[key])
    return marked


def trainable_mask(params: Any, *extra_masks: Any) -> Any:
    """The PEFT trainable mask: `adapter_mask` OR any extra masks (BitFit, LN-tuning, ...)."""
    mask = adapter_mask(params)
    return any_mask(mask, *extra_masks) if extra_masks else mask


def count_trainable(params: Any, mask: Any) -> tuple[int, int]:
    """-> (trainable parameters, all parameters) of ``params`` under ``mask``; a quantized kernel
    counts as the parameters it stands for, not its packed bytes."""
    counted = lambda x: hasattr(x, "param_count")  # noqa: E731
    sizes = jax.tree.leaves(
        jax.tree.map(lambda x, m: (param_count(x), any(bool(b) for b in jax.tree.leaves(m))), params, mask,
                     is_leaf=counted),
        is_leaf=lambda x: isinstance(x, tuple))
    total = sum(n for n, _ in sizes)
    return sum(n for n, m in sizes if m), total


def describe_trainable(params: Any, mask: Any) -> str:
    """``trainable params: 1,234 of 5,678 (21.73%)``, as PEFT's print_trainable_parameters."""
    trainable, total = count_trainable(params, mask)
    return f"trainable params: {trainable:,} of {total:,} ({100.0 * trainable / max(total, 1):.4f}%)"


def base_model(params: Any) -> Any:
    """The tree without any PEFT: adapter leaves replaced by their ``base`` (recursively),
    `ADDED_KEYS` dropped. No array is copied, so under jit this is free: use it for the
    adapter-disabled model (a reference model for DPO/PPO)."""

    def strip(x):
        while is_adapter(x):
            x = x.base
        return x

    out = jax.tree.map(strip, params, is_leaf=is_adapter)
    if isinstance(out, dict):
        out = {k: v for k, v in out.items() if k not in ADDED_KEYS}
    return out


def adapter_leaves(params: Any) -> Iterable[Any]:
    return [x for x in jax.tree.leaves(params, is_leaf=is_adapter) if is_adapter(x)]


def merge_type(params: Any, leaf_type: type) -> Any:
    """Every leaf of ``leaf_type`` folded into a plain kernel with its ``merged()``; other leaves
    (other adapter types included) untouched. `merge_adapters` folds every kind."""
    is_it = lambda x: isinstance(x, leaf_type)  # noqa: E731
    return jax.tree.map(lambda x: x.merged() if is_it(x) else x, params, is_leaf=is_it)


def merge_adapters(params: Any) -> Any:
    """Every adapter leaf (LoRA, DoRA, IA3, ..., nested ones innermost first) folded into a plain
    kernel with its ``merged()``; `ADDED_KEYS` subtrees (prompt / prefix) are refused."""
    if isinstance(params, dict) and any(k in params for k in ADDED_KEYS):
        raise ValueError(f"params hold {[k for k in ADDED_KEYS if k in params]}, which cannot be merged into weights")

    def fold(path, x):
        if not is_adapter(x):
            return x
        if is_adapter(x.base):
            x = dataclasses.replace(x, base=fold(path, x.base))
        if not hasattr(x, "merged"):
            raise TypeError(f"{keypath_str(path)}: {type(x).__name__} has no merged() and cannot be folded")
        return x.merged()

    return jax.tree_util.tree_map_with_path(fold, params, is_leaf=is_adapter)


def merge_quantized(params: Any, *, requantize: bool = False) -> Any:
    """Fold every adapter into its base for inference, quantized bases included.

    A quantized base is dequantized and the adapter merged in the base's original dtype, giving
    a dense kernel (``requantize=False``, lossless w.r.t. the adapted model), or that kernel
    quantized again with the base's settings (``requantize=True``): the merged update is then
    rounded to the 4-bit grid and the model moves away from the adapted one. Either way a
    warning says what happened, and how far requantization moved the kernels."""
    configs = quantized_paths(params)
    merged = merge_adapters(params)
    if not configs:
        return merged
    if not requantize:
        warnings.warn(f"merge: {len(configs)} quantized bases were dequantized and merged into dense kernels "
                      "(16/32-bit, as the base's original dtype); pass requantize=True to store them quantized",
                      stacklevel=2)
        return merged
    worst = [0.0]

    def again(path, leaf):
        where = keypath_str(path)
        if where not in configs or is_quantized(leaf):
            return leaf
        q = quantize_kernel(leaf, configs[where], where)
        err = float(jnp.max(jnp.abs(q.dequantize(jnp.float32) - leaf.astype(jnp.float32))))
        scale = float(jnp.max(jnp.abs(leaf.astype(jnp.float32)))) or 1.0
        worst[0] = max(worst[0], err / scale)
        return q

    out = jax.tree_util.tree_map_with_path(again, merged, is_leaf=is_typed_weight)
    warnings.warn(f"merge: {len(configs)} quantized bases were merged in 16/32-bit and quantized again "
                  f"({next(iter(configs.values())).kind}); requantizing loses precision: the largest change is "
                  f"{worst[0]:.2%} of a kernel's absmax", stacklevel=2)
    return out

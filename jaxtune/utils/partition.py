"""Trainable / frozen: a partition of the param tree by a boolean mask (DESIGN contract 4).

``trainable, frozen = split(params, mask)`` gives two trees of the params'
structure with ``None`` where the other half holds the leaf; ``join`` puts
them back. ``jax.grad`` and the optimizer see only ``trainable``; ``frozen``
rides along unchanged (for PEFT: the base weights). Masks are per *array*,
so a typed leaf (LoRA: frozen base, trainable A/B) can be split inside.
"""

from __future__ import annotations

import re
from typing import Any, Optional, Sequence

import jax

from jaxtune.utils.tree import keypath_str


def never_trainable(leaf: Any) -> bool:
    """A typed leaf that declares ``never_trainable`` (a quantized kernel: its codes are integers;
    QLoRA trains adapters on it) is frozen whatever the mask says."""
    return bool(getattr(leaf, "never_trainable", False))


def mask_by_regex(params: Any, patterns: Optional[Sequence[str]]) -> Any:
    """True for array leaves whose path matches any regex; ``None`` patterns = everything trainable.
    Quantized kernels are always frozen (`never_trainable`)."""
    compiled = None if patterns is None else [re.compile(p) for p in patterns]  # plain regexes: no target presets

    def mark(path, leaf):
        if never_trainable(leaf):
            return jax.tree.map(lambda _: False, leaf)
        return compiled is None or any(c.search(keypath_str(path)) for c in compiled)

    mask = jax.tree_util.tree_map_with_path(mark, params, is_leaf=never_trainable)
    if not any(jax.tree.leaves(mask)):
        raise ValueError(f"trainable patterns {list(patterns or ['<all>'])} match no parameter that can train "
                         "(quantized kernels never do)")
    return mask


def split(params: Any, mask: Any) -> tuple[Any, Any]:
    """-> (trainable, frozen): ``mask`` has a bool for every array leaf of ``params``."""
    trainable = jax.tree.map(lambda x, m: x if m else None, params, mask)
    frozen = jax.tree.map(lambda x, m: None if m else x, params, mask)
    return trainable, frozen


def join(trainable: Any, frozen: Any) -> Any:
    """Inverse of `split`. ``frozen=None`` means nothing is frozen."""
    if frozen is None:
        return trainable
    is_none = lambda x: x is None  # noqa: E731
    t_leaves, treedef = jax.tree.flatten(trainable, is_leaf=is_none)
    f_leaves, f_treedef = jax.tree.flatten(frozen, is_leaf=is_none)
    if treedef != f_treedef:
        raise ValueError("join: trainable and frozen trees do not come from the same split")
    merged = []
    for i, (t, f) in enumerate(zip(t_leaves, f_leaves)):
        if (t is None) == (f is None):
            raise ValueError(f"join: leaf {i} is {'in neither' if t is None else 'in both'} halves")
        merged.append(f if t is None else t)
    return jax.tree.unflatten(treedef, merged)


def any_mask(*masks: Any) -> Any:
    """Element-wise OR of masks over the same tree."""
    first, *rest = masks
    return jax.tree.map(lambda *bits: any(bool(b) for b in bits), first, *rest)


def param_count(x: Any) -> int:
    """Parameters in one leaf: its size, or what a typed leaf says it stands for (``param_count``:
    a quantized kernel counts its [in, out] parameters, not its packed bytes)."""
    if hasattr(x, "param_count"):  # a half of a split tree holds the leaf without its arrays: nothing to count
        return int(x.param_count) if jax.tree.leaves(x) else 0
    return int(x.size)


def count(tree: Any) -> int:
    """Number of parameters in the leaves of ``tree`` (see `param_count`)."""
    return sum(param_count(x) for x in jax.tree.leaves(tree, is_leaf=lambda x: hasattr(x, "param_count")))

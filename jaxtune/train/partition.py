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



def mask_by_regex(params: Any, patterns: Optional[Sequence[str]]) -> Any:
    """True for array leaves whose path matches any regex; ``None`` patterns = everything trainable."""
    if patterns is None:
        return jax.tree.map(lambda _: True, params)
    compiled = [re.compile(p) for p in patterns]
    mask = jax.tree_util.tree_map_with_path(lambda p, _: any(c.search(keypath_str(p)) for c in compiled), params)
    if not any(jax.tree.leaves(mask)):
        raise ValueError(f"trainable patterns {list(patterns)} match no parameter")
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


def count(tree: Any) -> int:
    """Number of scalars in the array leaves of ``tree``."""
    return sum(int(x.size) for x in jax.tree.leaves(tree))

"""Choosing parameters by path: the one target-selection helper of every PEFT method and of quantization.

Targets are preset names (`TARGET_PRESETS`) or regular expressions searched in a leaf's path
(``layers_3/attn/q_proj/kernel``). `target_patterns` compiles them (a bad regex is an error
naming the config key); `map_targets` applies a function to every matching leaf and refuses a
selection that matches nothing.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Optional, Sequence, Union

import jax

from jaxtune.utils.tree import keypath_str

_ATTENTION = r"attn/(q|k|v|o)_proj/kernel$"
_MLP = r"mlp/(gate|up|down)_proj/kernel$"
TARGET_PRESETS: dict[str, tuple[str, ...]] = {
    "attention": (_ATTENTION,),
    "attention-qv": (r"attn/(q|v)_proj/kernel$",),
    "mlp": (_MLP,),
    "all-linear": (_ATTENTION, _MLP),
}
PATH_EXAMPLE = "paths look like layers_0/attn/q_proj/kernel"

Targets = Union[str, Sequence[str]]


def as_targets(targets: Targets) -> tuple[str, ...]:
    return (targets,) if isinstance(targets, str) else tuple(targets)


def target_patterns(targets: Targets, key: str = "targets") -> list[re.Pattern]:
    """Preset names expanded and every regex compiled; ``key`` names the config key in errors."""
    out = []
    for t in as_targets(targets):
        for pattern in TARGET_PRESETS.get(t, (t,)):
            try:
                out.append(re.compile(pattern))
            except re.error as err:
                raise ValueError(f"{key}: bad regex {pattern!r}: {err}") from None
    return out


def matches(path: str, patterns: Sequence[re.Pattern]) -> bool:
    return any(p.search(path) for p in patterns)


def map_targets(params: Any, targets: Targets, fn: Callable[[str, Any], Any], *, key: str = "targets",
                is_leaf: Optional[Callable[[Any], bool]] = None, what: str = "parameter path") -> Any:
    """A new tree with ``fn(path, leaf)`` at every leaf whose path matches ``targets`` (other leaves
    untouched). ``is_leaf`` stops the walk at typed weights. Raises ValueError naming ``key`` (and
    ``what`` the targets select) when no path matches."""
    patterns = target_patterns(targets, key)
    matched = [False]

    def visit(path, leaf):
        where = keypath_str(path)
        if not matches(where, patterns):
            return leaf
        matched[0] = True
        return fn(where, leaf)

    out = jax.tree_util.tree_map_with_path(visit, params, is_leaf=is_leaf)
    if not matched[0]:
        raise ValueError(f"{key} {list(as_targets(targets))} match no {what} ({PATH_EXAMPLE})")
    return out

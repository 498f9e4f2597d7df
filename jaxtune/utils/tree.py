"""Addressing leaves of nested-dict param trees by path (a tuple of keys)."""

from __future__ import annotations

from typing import Any

Path = tuple[str, ...]
_MISSING = object()


def path_str(path: Path) -> str:
    return "/".join(str(p) for p in path)


def get_path(tree: Any, path: Path, *, missing_ok: bool = False) -> Any:
    node = tree
    for i, key in enumerate(path):
        if not isinstance(node, dict) or key not in node:
            if missing_ok:
                return None
            raise KeyError(f"no leaf at {path_str(path)} (missing {path_str(path[: i + 1])})")
        node = node[key]
    return node


def set_path(tree: dict, path: Path, value: Any) -> None:
    """Set a leaf, creating dicts on the way; refuses to overwrite an existing leaf."""
    node = tree
    for key in path[:-1]:
        node = node.setdefault(key, {})
    if path[-1] in node:
        raise KeyError(f"leaf {path_str(path)} is already set")
    node[path[-1]] = value


def keypath_str(path) -> str:
    """A jax key path (from ``tree_map_with_path``) as ``a/b/c``, the form rules and errors use."""
    return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)

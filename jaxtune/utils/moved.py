"""Names that moved to another module: a module ``__getattr__`` that says where they went, so code
written against the old spelling fails with the new one in the message (and imports nothing)."""

from __future__ import annotations

from typing import Callable


def moved_names(module: str, new_homes: dict[str, str]) -> Callable[[str], object]:
    """-> a module-level ``__getattr__``: ``new_homes`` maps an old name to its new ``module.name``."""

    def __getattr__(name: str):
        if name in new_homes:
            raise AttributeError(f"{module}.{name} moved: use {new_homes[name]}")
        raise AttributeError(f"module {module!r} has no attribute {name!r}")

    return __getattr__

"""Small helpers over sequences of token ids."""

from __future__ import annotations

from typing import Sequence


def common_prefix(a: Sequence, b: Sequence) -> int:
    """The length of the longest common prefix of ``a`` and ``b``."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n

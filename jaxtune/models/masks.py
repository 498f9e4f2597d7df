"""Who attends to whom: one rule from per-token data, never a stored [q, k] array.

Query i sees key j iff both lie in the same non-zero segment (``segment_ids``: 0 marks padding,
equal non-zero ids one packed document) and, for a causal model, j <= i by slot index (within a
sliding window: i - j < window); without causality (bidirectional models) every key of the segment
(within a window: |i - j| < window). Slot indices count places in the row or the KV cache, so a
cache's empty slots (segment 0) and left padding are the same rule.

A prefix (prefix tuning, or prompt tuning reduced to its per-layer K/V) adds ``num_prefix`` key
columns in front of the others, at positions 0..n-1 before every packed document: every
non-padding query sees all of them (in a sliding-window layer, those within the window of its
position, as Hugging Face does with a prefix in its cache), padding queries see none.

`MaskInfo` carries that data; `MaskInfo.tile` gives the visibility of one block of queries
against one block of keys (what blockwise attention computes per tile), `MaskInfo.dense` the
whole boolean mask [batch, 1, q, num_prefix + k] that dense attention needs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import jax
import jax.numpy as jnp


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class MaskInfo:
    """Per-token attention data: q_segments [batch, q], k_segments [batch, k], q_index [q] and
    k_index [k] (slot indices), q_positions [batch, q] (positions counting the prefix; needed
    only for a windowed prefix); static: causal, window, num_prefix, cached (the keys are a KV
    cache, not the queries' own sequence)."""

    q_segments: jax.Array
    k_segments: jax.Array
    q_index: jax.Array
    k_index: jax.Array
    q_positions: Optional[jax.Array] = None
    causal: bool = field(default=True, metadata=dict(static=True))
    window: Optional[int] = field(default=None, metadata=dict(static=True))
    num_prefix: int = field(default=0, metadata=dict(static=True))
    cached: bool = field(default=False, metadata=dict(static=True))

    def tile(self, q_segments: jax.Array, q_index: jax.Array, k_segments: jax.Array, k_index: jax.Array) -> jax.Array:
        """[batch, bq, bk] bool for the queries (segments [batch, bq], slots [bq]) and keys given."""
        same = (q_segments[:, :, None] == k_segments[:, None, :]) & (k_segments[:, None, :] != 0)
        delta = q_index[:, None] - k_index[None, :]
        if self.causal:
            visible = delta >= 0
            if self.window is not None:
                visible = visible & (delta < self.window)
        elif self.window is not None:
            visible = jnp.abs(delta) < self.window
        else:
            return same
        return same & visible[None]

    def prefix_tile(self, q_segments: jax.Array, q_positions: Optional[jax.Array]) -> jax.Array:
        """[batch, bq, num_prefix] bool: the prefix columns the queries see."""
        cols = jnp.broadcast_to((q_segments != 0)[:, :, None], q_segments.shape + (self.num_prefix,))
        if self.window is not None:
            cols = cols & (q_positions[:, :, None] - jnp.arange(self.num_prefix)[None, None, :] < self.window)
        return cols

    def dense(self) -> jax.Array:
        """The whole mask [batch, 1, q, num_prefix + k] (True = may attend)."""
        mask = self.tile(self.q_segments, self.q_index, self.k_segments, self.k_index)
        if self.num_prefix:
            mask = jnp.concatenate([self.prefix_tile(self.q_segments, self.q_positions), mask], axis=-1)
        return mask[:, None]


def attention_mask(q_segments: jax.Array, k_segments: jax.Array, q_index: jax.Array, k_index: jax.Array,
                   window: Optional[int] = None, causal: bool = True) -> jax.Array:
    """The dense mask [batch, 1, q, k] of `MaskInfo` without a prefix."""
    return MaskInfo(q_segments, k_segments, q_index, k_index, causal=causal, window=window).dense()

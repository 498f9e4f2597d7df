"""Rows of fixed length from token pieces: packing (several documents per row) or padding.

A *piece* is a run of ``n + 1`` consecutive tokens of one document: ``n`` inputs and their
``n`` next-token targets. Cutting a long document into pieces that overlap by one token
keeps every target exactly once, so splitting a document across rows drops nothing.
A row of ``seq_len`` slots holds pieces back to back; each gets its own segment id
(1, 2, ...) and positions restarting at 0, so attention never crosses documents
(`jaxtune.models.attention.attention_mask`) and the slots after the last piece are
padding (segment 0, no loss).
"""

from __future__ import annotations

from typing import Optional

import numpy as np

ROW_KEYS = ("tokens", "targets", "loss_mask", "segment_ids", "positions")


def empty_rows(batch: int, seq_len: int, pad_id: int = 0) -> dict[str, np.ndarray]:
    """All-padding rows in the LM batch layout (no real token, no loss)."""
    return {
        "tokens": np.full((batch, seq_len), pad_id, np.int32),
        "targets": np.full((batch, seq_len), pad_id, np.int32),
        "loss_mask": np.zeros((batch, seq_len), np.float32),
        "segment_ids": np.zeros((batch, seq_len), np.int32),
        "positions": np.zeros((batch, seq_len), np.int32),
    }


def write_piece(rows: dict[str, np.ndarray], row: int, start: int, piece: np.ndarray, segment: int,
                trained: Optional[np.ndarray] = None) -> int:
    """Write ``piece`` (n + 1 tokens) into ``rows[row]`` at slot ``start`` as segment ``segment``;
    returns the next free slot. ``trained`` (n + 1 bools, one per token): which tokens are
    targets (default: all; SFT trains only completions)."""
    n = len(piece) - 1
    end = start + n
    rows["tokens"][row, start:end] = piece[:-1]
    rows["targets"][row, start:end] = piece[1:]
    rows["loss_mask"][row, start:end] = 1.0 if trained is None else trained[1:]
    rows["segment_ids"][row, start:end] = segment
    rows["positions"][row, start:end] = np.arange(n, dtype=np.int32)
    return end


def piece_of(tokens: np.ndarray, offset: int, room: int) -> np.ndarray:
    """The piece of a document starting at input ``offset`` with at most ``room`` inputs."""
    return tokens[offset: offset + room + 1]


def concat_rows(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

"""Shapes and repeats of a suite run: `FULL` on an accelerator, `SMOKE` for --smoke."""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional


@dataclasses.dataclass(frozen=True)
class Sizes:
    """Shapes and repeats of one run: `FULL` on an accelerator, `SMOKE` for --smoke."""

    rank: int
    correctness: tuple  # (M, K, N)
    timing_ms: tuple  # M, in the order they are measured (goal rows first)
    timing_kn: tuple  # (K, N)
    repeats: Callable[[int], int]  # M -> repeats of a kernel timing
    autotune_candidates: int  # of the reduced list (after the heuristic's tiles)
    attn_lengths: tuple
    attn_heads: tuple  # (heads, kv heads, head_dim)
    attn_repeats: int
    mfu_model: dict
    mfu_seq: int
    mfu_batch: int
    train_repeats: int
    qlora_overrides: tuple  # key=value on top of configs/qlora_llama3_8b.yaml
    qlora_model: Optional[dict]  # None: the llama-3.1-8b preset with one layer
    qlora_repeats: int


FULL = Sizes(
    rank=16,
    correctness=((16, 4096, 4096), (512, 4096, 4096)),
    timing_ms=(1, 16, 2048, 8192, 128),
    timing_kn=((4096, 4096), (4096, 14336), (14336, 4096)),
    repeats=lambda m: 20 if m <= 128 else (10 if m <= 2048 else 5),
    autotune_candidates=4,
    attn_lengths=(2048, 8192),
    attn_heads=(32, 8, 128),
    attn_repeats=10,
    mfu_model=dict(family="llama", vocab_size=32000, hidden_size=2048, num_layers=16, num_heads=16, num_kv_heads=8,
                   head_dim=128, intermediate_size=5632, max_position_embeddings=4096),
    mfu_seq=2048,
    mfu_batch=8,
    train_repeats=5,
    qlora_overrides=(),
    qlora_model=None,
    qlora_repeats=5,
)

SMOKE = Sizes(
    rank=8,
    correctness=((16, 256, 256),),
    timing_ms=(1, 64),
    timing_kn=((256, 256),),
    repeats=lambda m: 1,
    autotune_candidates=1,
    attn_lengths=(128,),
    attn_heads=(4, 2, 32),
    attn_repeats=1,
    mfu_model=dict(family="llama", vocab_size=256, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                   head_dim=16, intermediate_size=128, max_position_embeddings=128),
    mfu_seq=64,
    mfu_batch=2,
    train_repeats=1,
    qlora_overrides=("train.batch_size=4", "train.seq_len=64", "train.grad_accum=2", "train.loss_chunk_tokens=64"),
    qlora_model=dict(family="llama", vocab_size=512, hidden_size=128, num_layers=1, num_heads=4, num_kv_heads=2,
                     head_dim=32, intermediate_size=256, max_position_embeddings=256),
    qlora_repeats=1,
)

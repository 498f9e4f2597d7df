"""Attention on this machine: speed of forward + backward per implementation, and memory by length.

    python benchmarks/attention.py [--speed] [--memory] [--lengths 256,2048] [--blocks 64,128,256]

--speed: one attention call's forward + backward (gradients of q, k, v), causal, GQA 8 query / 2
key-value heads, head_dim 64, batch such that batch x length = 4096 tokens (8 x 512, 2 x 2048, ...)
over at least 2 rows, fp32, median of --repeats after a warm-up: the dense paths (``xla``: grouped
einsum, ``dpa``: jax.nn.dot_product_attention) and blockwise at each --blocks size (q and kv tiles
alike). --memory: XLA's compiled memory analysis (temporary bytes) of the same forward + backward
at batch 1 for each length, dense vs blockwise -- a memory figure, not a timing.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp

from jaxtune.models.attention import attend
from jaxtune.models.masks import MaskInfo


def inputs(batch: int, length: int, heads: int = 8, kv_heads: int = 2, head_dim: int = 64, abstract: bool = False):
    shapes = [(batch, length, heads, head_dim), (batch, length, kv_heads, head_dim), (batch, length, kv_heads, head_dim)]
    if abstract:
        qkv = [jax.ShapeDtypeStruct(s, jnp.float32) for s in shapes]
    else:
        keys = jax.random.split(jax.random.key(0), 3)
        qkv = [jax.random.normal(key, s, jnp.float32) for key, s in zip(keys, shapes)]
    seg = jnp.ones((batch, length), jnp.int32)
    index = jnp.arange(length, dtype=jnp.int32)
    return qkv, MaskInfo(seg, seg, index, index, causal=True)


def step(impl: str, mask: MaskInfo, block: int):
    """jit(grad) of sum(attention(q, k, v) * w) with respect to q, k, v."""

    def loss(q, k, v):
        out = attend(q, k, v, mask, impl, block_q=block, block_kv=block)
        return jnp.sum(out * jnp.cos(jnp.arange(out.shape[-1], dtype=out.dtype)))

    return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def median_ms(fn, args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def speed(lengths, blocks, repeats):
    print("| length | batch | xla (dense) | dpa (dense) | " + " | ".join(f"blockwise {b}" for b in blocks) + " |")
    print("|---" * (4 + len(blocks)) + "|")
    for length in lengths:
        batch = max(4096 // length, 2)
        qkv, mask = inputs(batch, length)
        cells = [f"{median_ms(step(impl, mask, 0), qkv, repeats):.1f} ms" for impl in ("xla", "dpa")]
        cells += [f"{median_ms(step('blockwise', mask, b), qkv, repeats):.1f} ms" for b in blocks]
        print(f"| {length} | {batch} | " + " | ".join(cells) + " |", flush=True)


def memory(lengths, block):
    print("| length | dense temp bytes | blockwise temp bytes |")
    print("|---|---|---|")
    for length in lengths:
        qkv, mask = inputs(1, length, abstract=True)
        cells = []
        for impl in ("xla", "blockwise"):
            compiled = step(impl, mask, block).lower(*qkv).compile()
            cells.append(f"{compiled.memory_analysis().temp_size_in_bytes / 2**20:,.1f} MiB")
        print(f"| {length} | " + " | ".join(cells) + " |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--speed", action="store_true")
    parser.add_argument("--memory", action="store_true")
    parser.add_argument("--lengths", default="256,2048")
    parser.add_argument("--memory-lengths", default="2048,8192,32768")
    parser.add_argument("--blocks", default="64,128,256")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    blocks = [int(b) for b in args.blocks.split(",")]
    if args.speed or not args.memory:
        speed([int(n) for n in args.lengths.split(",")], blocks, args.repeats)
    if args.memory:
        memory([int(n) for n in args.memory_lengths.split(",")], blocks[-1])


if __name__ == "__main__":
    main()

"""What the fused quantized-matmul kernels share (GPU `quant_matmul`, TPU `quant_matmul_tpu`): the
packed layout's checks, the in-register unpacking of two 4-bit codes a byte and their code-table
lookup, and padding to tile multiples.

Layout (bitsandbytes' ``nn.Linear`` weight, see `jaxtune.quant.weight`): ``codes: [N, K/2]`` uint8,
element ``k`` of row ``n`` in the high nibble when ``k`` is even; int8 codes ``[N, K]``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

KINDS = ("nf4", "fp4", "int4", "int8")
FLOAT_KINDS = ("nf4", "fp4")  # 4-bit codes that index a table of 16 floats


def check_layout(kind: str, table: tuple[float, ...], codes: jax.Array, n: int, k: int) -> None:
    """The kind is known, a float kind has its 16 values, and the codes are ``[n, k/2]`` (4-bit) or
    ``[n, k]`` (int8): the 2-D layout, inputs a multiple of the blocksize."""
    if kind not in KINDS:
        raise ValueError(f"fused kernel: unsupported quantization {kind!r} ({', '.join(KINDS)})")
    if kind in FLOAT_KINDS and len(table) != 16:
        raise ValueError(f"fused kernel: {kind} needs its 16-value code table (table=...), got {len(table)} values")
    want = (n, k) if kind == "int8" else (n, k // 2)
    if codes.ndim != 2 or tuple(codes.shape) != want:
        raise ValueError(f"fused kernel: codes of shape {tuple(codes.shape)}, expected {want} (the 2-D layout: "
                         "inputs a multiple of the blocksize)")


def select_tree(c: jax.Array, values: tuple[float, ...]) -> jax.Array:
    """``values[c]`` for int32 codes ``c`` in [0, 16) by a 4-level tree of selects on the code's
    bits (neither Triton nor Mosaic gathers from a small table)."""
    level = [jnp.full(c.shape, v, jnp.float32) for v in values]
    for bit in range(4):
        on = ((c >> bit) & 1) == 1
        level = [jnp.where(on, level[i + 1], level[i]) for i in range(0, len(level), 2)]
    return level[0]


def dequant_halves(packed: jax.Array, kind: str, table: tuple[float, ...]) -> tuple[jax.Array, jax.Array]:
    """Packed bytes ``[rows, cols]`` -> float32 values of the high and the low nibbles, ``[rows, cols]`` each."""
    p = packed.astype(jnp.int32)
    hi, lo = (p >> 4) & 0xF, p & 0xF
    if kind == "int4":
        return (hi - 8).astype(jnp.float32), (lo - 8).astype(jnp.float32)
    return select_tree(hi, table), select_tree(lo, table)


def round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def pad_to(a: jax.Array, shape: tuple[int, ...], value=0) -> jax.Array:
    """``a`` padded at the end of each dimension to ``shape`` (no copy when it already has it)."""
    pads = [(0, s - d) for d, s in zip(a.shape, shape)]
    return a if all(p == (0, 0) for p in pads) else jnp.pad(a, pads, constant_values=value)

"""Code tables and blockwise quantization, bit-compatible with bitsandbytes.

Everything here works on *flat* float arrays (jnp, jit-able) and follows bitsandbytes'
conventions exactly, so that the bytes are interchangeable:

- **4-bit (NF4 / FP4)** -- `quantize_4bit`: the flat tensor is cut into blocks of ``blocksize``
  consecutive values (the last block may be short); each block's absmax is stored in float32;
  values are scaled by ``x * (1 / absmax)`` (absmax clamped at 1e-38), clamped to [-1, 1] and
  mapped to the nearest of the 16 code values (ties to the lower code value: the midpoint
  itself belongs to the bin below). Two codes per byte, the first element in the high nibble;
  an odd element count is padded with the code of 0.
- **8-bit blockwise** (bitsandbytes' ``quantize_blockwise``, used for double quantization and
  8-bit optimizer state) -- `quantize_blockwise`: scaled and clamped as above, then the nearest
  of 256 code values (ties to the lower index), one byte each. This is the rule of
  bitsandbytes' reference (PyTorch) kernel and its CUDA kernel; its CPU library's binary search
  is approximate and picks the farther neighbour for ~0.2% of values near a midpoint.
- **double quantization** (QLoRA) -- `double_quantize`: the float32 absmax vector minus its mean
  (the ``offset``) is quantized 8-bit blockwise with the signed dynamic map, blocksize 256.

The code tables are the published ones: NF4 from the QLoRA paper (quantiles of N(0, 1)),
bitsandbytes' FP4 (1 sign, 2 exponent, 1 mantissa bit; index = bit pattern) and the dynamic
tree map of Dettmers (2015), built by `dynamic_map` with float32 arithmetic as bitsandbytes
builds it. This module knows nothing of models or param trees (see `jaxtune.quant.weight`).
"""

from __future__ import annotations

import numpy as np
import jax
import jax.numpy as jnp

BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
NESTED_BLOCKSIZE = 256

# NF4: index -> value (sorted ascending), the QLoRA paper's table.
NF4 = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
], np.float32)

# FP4 (E2M1 without inf/nan): index = bit pattern sign|e1 e0|m, values / 12 so that max = 1.
FP4 = (np.array([0, 0.0625, 8, 12, 4, 6, 2, 3, -0.0, -0.0625, -8, -12, -4, -6, -2, -3], np.float32)
       / np.float32(12)).astype(np.float32)

CODES_4BIT = {"nf4": NF4, "fp4": FP4}


def _linspace_f32(start: float, end: float, n: int) -> np.ndarray:
    """torch.linspace in float32 on CPU: the first half counts up from ``start``, the second
    down from ``end``, each value a single-rounded ``a + step * i``."""
    s, e = np.float32(start), np.float32(end)
    step = np.float32((e - s) / np.float32(n - 1))
    i = np.arange(n, dtype=np.float64)
    up = np.float64(s) + np.float64(step) * i
    down = np.float64(e) - np.float64(step) * (n - 1 - i)
    return np.where(i < n // 2, up, down).astype(np.float32)


def dynamic_map(signed: bool = True, max_exponent_bits: int = 7, total_bits: int = 8) -> np.ndarray:
    """The dynamic tree quantization map (Dettmers, 2015, "8-Bit Approximations for Parallelism
    in Deep Learning"): for each decimal exponent -6..0 the midpoints of a linear grid over
    [0.1, 1] at that scale, with more grid points (fraction bits) for larger exponents; 0 and 1
    added; sorted. 256 float32 values in [-1, 1] (signed) or [0, 1]."""
    values: list[np.ndarray] = []
    non_sign_bits = total_bits - 1
    for i in range(max_exponent_bits):
        extra = 0 if signed else 1
        n = 2 ** (i + non_sign_bits - max_exponent_bits + extra) + 1
        grid = _linspace_f32(0.1, 1.0, n)
        means = ((grid[:-1] + grid[1:]) / np.float32(2)).astype(np.float32)
        scale = np.float32(10.0 ** (-(max_exponent_bits - 1) + i))
        values.append((scale * means).astype(np.float32))
        if signed:
            values.append((-scale * means).astype(np.float32))
    extra_items = 2 ** (non_sign_bits - max_exponent_bits) - 1
    if extra_items > 0:  # not reached for the default 8 bits / 7 exponent bits
        grid = _linspace_f32(0.1, 1.0, extra_items + 1)
        means = ((grid[:-1] + grid[1:]) / np.float32(2)).astype(np.float32)
        scale = np.float32(10.0 ** (-(max_exponent_bits - 1) + max_exponent_bits - 1))
        values.append((scale * means).astype(np.float32))
        if signed:
            values.append((-scale * means).astype(np.float32))
    data = np.concatenate([*values, np.array([0.0, 1.0], np.float32)])
    if len(data) > 2 ** total_bits:
        raise ValueError(f"dynamic map: {len(data)} values do not fit {total_bits} bits")
    data = np.concatenate([data, np.zeros(2 ** total_bits - len(data), np.float32)])
    return np.sort(data).astype(np.float32)


DYNAMIC_SIGNED = dynamic_map(signed=True)
DYNAMIC_UNSIGNED = dynamic_map(signed=False)


def _check_blocksize(blocksize: int) -> None:
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"blocksize must be a power of two from 32 to 4096, got {blocksize}")


def _blocks(x: jax.Array, blocksize: int) -> tuple[jax.Array, int]:
    """Flat ``x`` -> ([n_blocks, blocksize] zero-padded float32, n)."""
    n = x.shape[0]
    n_blocks = -(-n // blocksize)
    padded = jnp.pad(x.astype(jnp.float32), (0, n_blocks * blocksize - n))
    return padded.reshape(n_blocks, blocksize), n


_TINY = np.array([1e-38], np.float32)  # bitsandbytes' absmax clamp (a subnormal: XLA flushes it in arithmetic)


def _absmax(blocks: jax.Array, n: int, blocksize: int) -> jax.Array:
    """Per-block absmax; as bitsandbytes, a short last block's absmax is stored clamped at 1e-38."""
    absmax = jnp.max(jnp.abs(blocks), axis=1)
    if n % blocksize:
        tiny = jax.lax.bitcast_convert_type(jnp.asarray(_TINY.view(np.uint32)[0]), jnp.float32)
        absmax = absmax.at[-1].set(jnp.where(absmax[-1] > 0, absmax[-1], tiny))
    return absmax


def _scale(blocks: jax.Array, absmax: jax.Array) -> jax.Array:
    """``clip(x * (1 / absmax), -1, 1)``; an all-zero block scales to zeros (bitsandbytes divides by
    the 1e-38 clamp, which XLA would flush to zero)."""
    ok = absmax >= np.finfo(np.float32).tiny
    inv = jnp.where(ok, 1.0 / jnp.where(ok, absmax, 1.0), 0.0)
    return jnp.clip(blocks * inv[:, None], -1.0, 1.0)


def _nearest_sorted(scaled: jax.Array, code: np.ndarray) -> jax.Array:
    """Index of the nearest value of the ascending ``code``; a value exactly on a midpoint goes
    to the lower index (bitsandbytes' bucketize over float32 midpoints): the number of midpoints
    below the value, by an unrolled binary search of elementwise selects over a constant table,
    which XLA fuses into one pass (``jnp.searchsorted`` loops and keeps int32 copies of the input)."""
    midpoints = ((code[:-1] + code[1:]) / np.float32(2)).astype(np.float32)
    bits = max(1, int(np.ceil(np.log2(len(midpoints) + 1))))
    table = jnp.asarray(np.concatenate([midpoints, np.full(2**bits - len(midpoints), np.inf, np.float32)]))
    idx = jnp.zeros(scaled.shape, jnp.int32)
    for b in reversed(range(bits)):
        step = idx + (1 << b)
        idx = jnp.where(scaled > table[step - 1], step, idx)
    return idx


def quantize_4bit(x: jax.Array, blocksize: int = 64, kind: str = "nf4") -> tuple[jax.Array, jax.Array]:
    """Flat float ``x: [n]`` -> (packed uint8 ``[ceil(n / 2)]``, absmax float32 ``[ceil(n / blocksize)]``)."""
    _check_blocksize(blocksize)
    code = CODES_4BIT[kind]
    order = np.argsort(code, kind="stable")  # sorted position -> code index (identity for NF4)
    blocks, n = _blocks(x, blocksize)
    absmax = _absmax(blocks, n, blocksize)
    scaled = _scale(blocks, absmax).reshape(-1)[:n]
    idx = jnp.asarray(order, jnp.int32)[_nearest_sorted(scaled, code[order])]
    if n % 2:
        zero = int(order[int(_np_nearest(np.float32(0.0), code[order]))])
        idx = jnp.concatenate([idx, jnp.full((1,), zero, jnp.int32)])
    idx = idx.astype(jnp.uint8).reshape(-1, 2)
    return (idx[:, 0] << 4) | idx[:, 1], absmax


def _np_nearest(v: np.float32, code: np.ndarray) -> int:
    midpoints = (code[:-1] + code[1:]) / np.float32(2)
    return int(np.searchsorted(midpoints, v, side="left"))


def unpack_4bit(packed: jax.Array, n: int) -> jax.Array:
    """uint8 ``[..., m]`` -> int32 codes ``[..., 2m]`` (high nibble first), trimmed to ``n`` on the last axis."""
    hi = (packed >> 4).astype(jnp.int32)
    lo = (packed & 0xF).astype(jnp.int32)
    codes = jnp.stack([hi, lo], axis=-1).reshape(*packed.shape[:-1], -1)
    return codes[..., :n]


def dequantize_4bit(packed: jax.Array, absmax: jax.Array, n: int, blocksize: int = 64, kind: str = "nf4",
                    dtype=jnp.float32) -> jax.Array:
    """Inverse of `quantize_4bit`: ``code[q] * absmax[block]`` in float32, cast to ``dtype``: [n]."""
    values = jnp.asarray(CODES_4BIT[kind])[unpack_4bit(packed, n)]
    blocks, _ = _blocks(values, blocksize)
    return (blocks * absmax[:, None]).reshape(-1)[:n].astype(dtype)


def quantize_blockwise(x: jax.Array, blocksize: int = NESTED_BLOCKSIZE, code: np.ndarray = DYNAMIC_SIGNED
                       ) -> tuple[jax.Array, jax.Array]:
    """Flat ``x: [n]`` -> (uint8 codes ``[n]``, absmax float32 ``[ceil(n / blocksize)]``): 8-bit
    blockwise quantization against a sorted 256-value ``code`` (bitsandbytes' quantize_blockwise)."""
    blocks, n = _blocks(x, blocksize)
    absmax = jnp.max(jnp.abs(blocks), axis=1)
    scaled = _scale(blocks, absmax).reshape(-1)[:n]
    return _nearest_sorted(scaled, code).astype(jnp.uint8), absmax


def dequantize_blockwise(codes: jax.Array, absmax: jax.Array, blocksize: int = NESTED_BLOCKSIZE,
                         code: np.ndarray = DYNAMIC_SIGNED) -> jax.Array:
    """Inverse of `quantize_blockwise` (float32, flat)."""
    n = codes.shape[0]
    blocks, _ = _blocks(jnp.asarray(code)[codes.astype(jnp.int32)], blocksize)
    return (blocks * absmax[:, None]).reshape(-1)[:n]


def double_quantize(absmax: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """float32 absmax ``[m]`` -> (uint8 codes ``[m]``, nested absmax ``[ceil(m / 256)]``, offset ``[]``):
    QLoRA's double quantization, ``absmax - mean`` 8-bit blockwise with the signed dynamic map."""
    offset = jnp.mean(absmax.astype(jnp.float32))
    codes, nested = quantize_blockwise(absmax - offset, NESTED_BLOCKSIZE, DYNAMIC_SIGNED)
    return codes, nested, offset


def double_dequantize(codes: jax.Array, nested: jax.Array, offset: jax.Array) -> jax.Array:
    """Inverse of `double_quantize`: the float32 absmax ``[m]``."""
    return dequantize_blockwise(codes, nested, NESTED_BLOCKSIZE, DYNAMIC_SIGNED) + offset

"""Pallas kernels for ``y = x @ dequant(Wq)^T (+ s * (x @ A) @ B)`` reading the packed weight once.

The weight is stored as bitsandbytes stores an ``nn.Linear`` weight (see `jaxtune.quant.weight`):
``codes: [N, K/2]`` uint8, two 4-bit codes per byte, element ``k`` of row ``n`` in the high nibble
when ``k`` is even; one float32 absmax per ``blocksize`` consecutive ``k`` of a row (``scales: [N,
K/blocksize]``, already double-dequantized by the caller); int8 codes ``[N, K]`` with a row scale.

Kernels (Pallas, Triton lowering on GPU; ``interpret=True`` runs them anywhere, which is how CI
tests them):

- `forward`: grid over ``(M/bm, N/bn, splits)``; each program loops over its share of K in tiles
  of ``bk`` (``bk`` divides ``blocksize``, so a tile uses one absmax per row). The packed tile is
  unpacked with shifts and masks into its even (high nibble) and odd (low nibble) halves, mapped
  through the 16-value code table by a 4-level select tree (no gather), scaled, and multiplied
  against the matching strided halves of ``x`` -- no interleaving of the unpacked values is
  needed. Accumulation is float32 on the matrix units (``preferred_element_type``). With one split
  the LoRA term ``s * xa @ B`` (``xa = x @ A`` computed once by the caller) is added in the
  epilogue; with several (the decode path, small M: split-K so that N/bn x splits programs stream
  the weight) the partial sums are reduced by the caller.
- `transposed`: ``dx = dy @ dequant(Wq)``, grid over ``(M/bm, K/bk)``, looping over N; the even and
  odd halves of each dx tile are stored with stride 2.

Inputs are padded by the wrappers to tile multiples, so no load or store is masked. This module
knows nothing of param trees, models or quantization formats: the 16 values of a 4-bit float code
(nf4 / fp4) come in as ``table``; `jaxtune.quant.matmul` calls it from the one linear op.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from jaxtune.kernels.packed import check_layout, dequant_halves, pad_to, round_up



@dataclass(frozen=True)
class Tiles:
    """Tile sizes of one call (see `jaxtune.kernels.tiles.choose`)."""

    bm: int = 64
    bn: int = 64
    bk: int = 64
    splits: int = 1  # split-K programs (decode path)
    num_warps: int = 4
    num_stages: int = 3


def _compiler_params(tiles: Tiles, interpret: bool):
    if interpret:
        return None
    try:
        from jax.experimental.pallas import triton as plgpu

        return plgpu.CompilerParams(num_warps=tiles.num_warps, num_stages=tiles.num_stages)
    except (ImportError, AttributeError):  # newer JAX: the Triton lowering's params moved or went away
        return None


def _dot(a: jax.Array, b: jax.Array, contract_b: int) -> jax.Array:
    """``a [m, k] . b`` over ``b``'s dimension ``contract_b`` (0: ``a @ b``, 1: ``a @ b.T``), float32."""
    return jax.lax.dot_general(a, b, (((1,), (contract_b,)), ((), ())), preferred_element_type=jnp.float32)


def _forward_kernel(x_ref, codes_ref, scales_ref, *rest, kind, table, blocksize, bk, k_block, lora, scale):
    """One ``[bm, bn]`` output tile over this program's ``k_block`` columns of K."""
    if lora:
        xa_ref, b_ref, o_ref = rest
    else:
        (o_ref,) = rest
    bm, bn = x_ref.shape[0], codes_ref.shape[0]
    half = bk // 2

    def body(t, acc):
        k0 = t * bk
        s = scales_ref[:, pl.ds((k0 // blocksize), 1)]  # [bn, 1]: bk divides blocksize
        if kind == "int8":
            w = codes_ref[:, pl.ds(k0, bk)].astype(jnp.float32) * s
            return acc + _dot(x_ref[:, pl.ds(k0, bk)], w.astype(x_ref.dtype), 1)
        hi, lo = dequant_halves(codes_ref[:, pl.ds(k0 // 2, half)], kind, table)
        x_even = x_ref[:, pl.ds(k0, half, stride=2)]
        x_odd = x_ref[:, pl.ds(k0 + 1, half, stride=2)]
        acc = acc + _dot(x_even, (hi * s).astype(x_ref.dtype), 1)
        return acc + _dot(x_odd, (lo * s).astype(x_ref.dtype), 1)

    acc = jax.lax.fori_loop(0, k_block // bk, body, jnp.zeros((bm, bn), jnp.float32))
    if lora:
        acc = acc + scale * _dot(xa_ref[...], b_ref[...], 0)
    o_ref[...] = acc.astype(o_ref.dtype)


def _transposed_kernel(dy_ref, codes_ref, scales_ref, o_ref, *, kind, table, blocksize, bn, n_total):
    """One ``[bm, bk]`` tile of ``dy @ W`` (``W = dequant(codes): [N, K]``), looping over N."""
    bm = dy_ref.shape[0]
    cols = o_ref.shape[1]  # bk
    half = cols // 2

    def body(t, accs):
        n0 = t * bn
        dy = dy_ref[:, pl.ds(n0, bn)]
        s = scales_ref[pl.ds(n0, bn), :]  # [bn, 1]
        if kind == "int8":
            w = codes_ref[pl.ds(n0, bn), :].astype(jnp.float32) * s
            return (accs[0] + _dot(dy, w.astype(dy.dtype), 0),)
        hi, lo = dequant_halves(codes_ref[pl.ds(n0, bn), :], kind, table)
        return (accs[0] + _dot(dy, (hi * s).astype(dy.dtype), 0), accs[1] + _dot(dy, (lo * s).astype(dy.dtype), 0))

    if kind == "int8":
        (acc,) = jax.lax.fori_loop(0, n_total // bn, body, (jnp.zeros((bm, cols), jnp.float32),))
        o_ref[...] = acc.astype(o_ref.dtype)
        return
    even, odd = jax.lax.fori_loop(0, n_total // bn, body,
                                  (jnp.zeros((bm, half), jnp.float32), jnp.zeros((bm, half), jnp.float32)))
    o_ref[:, pl.ds(0, half, stride=2)] = even.astype(o_ref.dtype)
    o_ref[:, pl.ds(1, half, stride=2)] = odd.astype(o_ref.dtype)


def _check(kind: str, table: tuple[float, ...], blocksize: int, codes: jax.Array, n: int, k: int,
           tiles: Tiles) -> None:
    check_layout(kind, table, codes, n, k)
    if kind != "int8" and (blocksize % tiles.bk or tiles.bk % 2):
        raise ValueError(f"fused kernel: tile bk={tiles.bk} must be even and divide the blocksize {blocksize}")


def forward(x: jax.Array, codes: jax.Array, scales: jax.Array, *, kind: str, blocksize: int, n: int,
            table: tuple[float, ...] = (), xa: Optional[jax.Array] = None, b: Optional[jax.Array] = None,
            lora_scale: float = 1.0,            tiles: Tiles = Tiles(), out_dtype=None, interpret: bool = False, poison: bool = False) -> jax.Array:
    """``x [M, K] @ dequant(codes)^T`` (+ ``lora_scale * xa [M, r] @ b [r, N]``) -> ``[M, N]``.

    ``scales``: float32 ``[N, K/blocksize]`` (nf4 / fp4 / int4) or ``[N]`` (int8, absmax / 127
    already applied by the caller); ``table``: the 16 code values of nf4 / fp4. ``poison``: start from
    a NaN-filled output buffer (tests: a
    tile the kernel does not write stays NaN)."""
    m, k = x.shape
    table = tuple(float(v) for v in table)
    _check(kind, table, blocksize, codes, n, k, tiles)
    out_dtype = out_dtype or x.dtype
    bm, bn, bk, splits = tiles.bm, tiles.bn, tiles.bk, tiles.splits
    # each split covers whole tiles and (4-bit) whole absmax blocks; bk divides the blocksize
    unit = splits * (bk if kind == "int8" else blocksize)
    mp, np_, kp = round_up(m, bm), round_up(n, bn), round_up(k, unit)
    if kind == "int8":
        scales = scales.reshape(n, 1)
        group = kp  # one scale per row
    else:
        group = blocksize
    xp = pad_to(x, (mp, kp))
    cp = pad_to(codes, (np_, kp if kind == "int8" else kp // 2))
    sp = pad_to(scales.astype(jnp.float32), (np_, 1 if kind == "int8" else kp // blocksize))
    k_block = kp // splits
    lora = xa is not None and splits == 1
    kernel = functools.partial(_forward_kernel, kind=kind, table=table, blocksize=group, bk=bk, k_block=k_block, lora=lora,
                               scale=float(lora_scale))
    in_specs = [
        pl.BlockSpec((bm, k_block), lambda i, j, s: (i, s)),
        pl.BlockSpec((bn, k_block if kind == "int8" else k_block // 2), lambda i, j, s: (j, s)),
        pl.BlockSpec((bn, 1) if kind == "int8" else (bn, k_block // blocksize),
                     (lambda i, j, s: (j, 0)) if kind == "int8" else (lambda i, j, s: (j, s))),
    ]
    args = [xp, cp, sp]
    if lora:
        r = xa.shape[1]
        rp = round_up(r, 16)  # the matrix units want 16 on every dimension
        args += [pad_to(xa.astype(x.dtype), (mp, rp)), pad_to(b.astype(x.dtype), (rp, np_))]
        in_specs += [pl.BlockSpec((bm, rp), lambda i, j, s: (i, 0)), pl.BlockSpec((rp, bn), lambda i, j, s: (0, j))]
    out_shape = jax.ShapeDtypeStruct((splits, mp, np_), jnp.float32 if splits > 1 else out_dtype)
    aliases = {}
    if poison:
        args.append(jnp.full(out_shape.shape, jnp.nan, out_shape.dtype))
        aliases = {len(args) - 1: 0}
        kernel = _ignore_last_input(kernel, len(args))
    out = pl.pallas_call(
        kernel, out_shape=out_shape, grid=(mp // bm, np_ // bn, splits), in_specs=in_specs + ([pl.BlockSpec(
            (None, bm, bn), lambda i, j, s: (s, i, j))] if poison else []),
        out_specs=pl.BlockSpec((None, bm, bn), lambda i, j, s: (s, i, j)),
        input_output_aliases=aliases, interpret=interpret, compiler_params=_compiler_params(tiles, interpret),
        name=f"{kind}_matmul",
    )(*args)
    if splits > 1:
        out = out.sum(axis=0)
        if xa is not None:
            out = out + lora_scale * _dot(pad_to(xa, (mp, xa.shape[1])).astype(jnp.float32),
                                          pad_to(b, (b.shape[0], np_)).astype(jnp.float32), 0)
        out = out.astype(out_dtype)
    else:
        out = out[0]
    return out[:m, :n]


def transposed(dy: jax.Array, codes: jax.Array, scales: jax.Array, *, kind: str, blocksize: int, k: int,
               table: tuple[float, ...] = (), tiles: Tiles = Tiles(), out_dtype=None, interpret: bool = False,
               poison: bool = False) -> jax.Array:
    """``dy [M, N] @ dequant(codes) [N, K]`` -> ``[M, K]`` (the input gradient of `forward`)."""
    m, n = dy.shape
    table = tuple(float(v) for v in table)
    _check(kind, table, blocksize, codes, n, k, tiles)
    out_dtype = out_dtype or dy.dtype
    bm, bn, bk = tiles.bm, tiles.bn, tiles.bk
    mp, np_, kp = round_up(m, bm), round_up(n, bn), round_up(k, bk if kind == "int8" else blocksize)
    dyp = pad_to(dy, (mp, np_))
    if kind == "int8":
        cp = pad_to(codes, (np_, kp))
        sp = pad_to(scales.reshape(n, 1).astype(jnp.float32), (np_, 1))
        code_spec = pl.BlockSpec((np_, bk), lambda i, j: (0, j))
        scale_spec = pl.BlockSpec((np_, 1), lambda i, j: (0, 0))
    else:
        cp = pad_to(codes, (np_, kp // 2))
        sp = pad_to(scales.astype(jnp.float32), (np_, kp // blocksize))
        code_spec = pl.BlockSpec((np_, bk // 2), lambda i, j: (0, j))
        per_block = blocksize // bk  # tiles of K per absmax block
        scale_spec = pl.BlockSpec((np_, 1), lambda i, j: (0, j // per_block))
    kernel = functools.partial(_transposed_kernel, kind=kind, table=table, blocksize=blocksize, bn=bn, n_total=np_)
    args, in_specs, aliases = [dyp, cp, sp], [pl.BlockSpec((bm, np_), lambda i, j: (i, 0)), code_spec, scale_spec], {}
    out_shape = jax.ShapeDtypeStruct((mp, kp), out_dtype)
    if poison:
        args.append(jnp.full(out_shape.shape, jnp.nan, out_dtype))
        in_specs.append(pl.BlockSpec((bm, bk), lambda i, j: (i, j)))
        aliases = {len(args) - 1: 0}
        kernel = _ignore_last_input(kernel, len(args))
    out = pl.pallas_call(
        kernel, out_shape=out_shape, grid=(mp // bm, kp // bk), in_specs=in_specs,
        out_specs=pl.BlockSpec((bm, bk), lambda i, j: (i, j)), input_output_aliases=aliases,
        interpret=interpret, compiler_params=_compiler_params(tiles, interpret), name=f"{kind}_matmul_t",
    )(*args)
    return out[:m, :k]


def _ignore_last_input(kernel, n_inputs: int):
    """A kernel taking one more input ref (the poisoned buffer aliased to the output) that it ignores."""

    @functools.wraps(kernel)
    def wrapped(*refs):
        return kernel(*refs[: n_inputs - 1], *refs[n_inputs:])

    return wrapped

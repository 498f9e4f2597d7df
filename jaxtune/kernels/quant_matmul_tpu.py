"""Pallas TPU (Mosaic) kernels for ``y = x @ dequant(Wq)^T (+ s * xa @ B)`` and ``dx = dy @ dequant(Wq)``.

Same math and weight layout as the Triton kernels of `jaxtune.kernels.quant_matmul` (the shared
unpacking and checks are `jaxtune.kernels.packed`): ``codes: [N, K/2]`` uint8, element ``k`` of row ``n`` in the high nibble when
``k`` is even, ``scales: [N, K/blocksize]`` float32 (nf4 / fp4 absmax, int4 absmax / 7); int8
codes ``[N, K]`` with one scale per row (absmax / 127). What changes is what Mosaic can lower:

- Tiles obey the TPU block rules: the last two dims of every block a multiple of (8 -- 16 for
  16-bit dtypes --, 128) or the whole array dim. The wrappers pad every operand with zeros to tile
  multiples and cut the output back. Zero rows of ``x`` / ``dy`` are what makes padded weight
  columns contribute nothing (nf4 code 0 is -1.0, not 0).
- No strided lane access in a kernel: the wrapper de-interleaves ``x`` into ``x[:, 0::2]`` and
  ``x[:, 1::2]`` (``[M, K/2]`` each, one XLA copy of ``x``), so the high nibbles of a codes tile meet
  ``x_even`` and the low ones ``x_odd``; `transposed` writes ``dx_even`` / ``dx_odd`` and the wrapper
  interleaves them. The codes are bitcast to int8 (free) so the in-kernel widening is a sign
  extension; ``(p >> 4) & 15`` / ``p & 15`` give the nibbles, the select tree the code values.
- Per-block scales: the scales block is ``[bn, K/blocksize]`` (the whole width: a full dim is a
  legal block) and a tile's scales are expanded along K by a matmul with a 0/1 matrix built from
  iota, ``E[b, c] = 1`` iff packed column ``c`` of K tile ``t`` lies in absmax block ``b``
  (``b*bs <= t*bk + 2c < (b+1)*bs``, no division), ``s_exp = s @ E`` at HIGHEST precision: exact,
  each output sums one nonzero product. Both nibbles of a byte share a block (even blocksize). This
  costs about ``3 * K/blocksize / bm`` of the main MXU work (HIGHEST is ~6 bf16 passes) but only
  standard ops (iota, compare, select, matmul); reshape-based repeats along lanes are relayouts
  Mosaic may refuse. int8: the row scale multiplies the accumulator in the epilogue (forward) or
  the ``dy`` tile (transposed: there N is the contraction), from a lane-major ``[1, N]`` array.
- Reduction over K (forward) / N (transposed) is the innermost, ``arbitrary`` grid axis with a
  float32 accumulator in VMEM scratch, zeroed at the first step and written (plus, forward, the
  LoRA term ``s * xa @ B``, rank padded to 128) at the last. Matmuls are ``dot_general`` with
  ``preferred_element_type=float32`` on compute-dtype operands; ``x @ W^T`` is an NT dot (contract
  dim 1 with dim 1). int8 codes are widened through int32/float32 to the compute dtype (exact).

``interpret=True`` runs the kernels in Pallas' interpreter (how CI tests them on CPU); a
``pltpu.InterpretParams()`` selects the TPU interpreter instead (it models VMEM scratch and the grid).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from jaxtune.kernels.packed import check_layout, dequant_halves, pad_to, round_up

LANE, SUBLANE = 128, 16  # 16 sublanes: bf16 packs two rows a sublane (float32 needs 8)


@dataclass(frozen=True)
class TpuTiles:
    """Tile sizes of one call. Rules (checked by the wrappers): ``bm`` a multiple of 16, ``bn`` of 128
    and ``bk`` of 256 (4-bit: ``bk / 2`` lanes of packed codes and ``x`` halves; int8: 128), or a tile
    that covers its whole dimension (one tile; ``bk`` even for 4-bit). ``bk`` need not relate to the
    blocksize: the scale expansion handles blocks that straddle or contain tiles."""

    bm: int = 256
    bn: int = 256
    bk: int = 512


def tiles_for(m: int, n: int, k: int, kind: str, blocksize: int) -> TpuTiles:
    """Heuristic tiles: ``bm`` = M rounded up to 16 (at most 256), ``bn`` 256 (128 when N <= 128), ``bk``
    512, or all of K when K <= 512, else the multiple of the lane unit that pads K least."""
    del blocksize  # any bk works with any blocksize (see the module docstring)
    bm = min(256, round_up(max(m, 1), SUBLANE))
    bn = LANE if n <= LANE else 256
    if k <= 512:
        return TpuTiles(bm, bn, round_up(k, 2))
    unit = LANE if kind == "int8" else 2 * LANE
    bk = min((512, 256, unit), key=lambda t: (round_up(k, t), -t))
    return TpuTiles(bm, bn, bk)


def _validate(tiles: TpuTiles, kind: str, m: int, n: int, k: int) -> None:
    kunit = LANE if kind == "int8" else 2 * LANE
    for name, t, unit, dim in (("bm", tiles.bm, SUBLANE, m), ("bn", tiles.bn, LANE, n), ("bk", tiles.bk, kunit, k)):
        if t <= 0 or (t % unit and t < dim):
            raise ValueError(f"TPU kernel: tile {name}={t} must be a multiple of {unit} or cover the whole "
                             f"dimension ({dim})")
    if kind != "int8" and tiles.bk % 2:
        raise ValueError(f"TPU kernel: tile bk={tiles.bk} must be even (two 4-bit codes a byte)")


def _check_all(kind, table, blocksize, codes, scales, n, k, tiles, m):
    check_layout(kind, table, codes, n, k)
    want = (n,) if kind == "int8" else (n, k // blocksize)
    if tuple(scales.shape) != want or (kind != "int8" and k % blocksize):
        raise ValueError(f"TPU kernel: scales of shape {tuple(scales.shape)}, expected {want} (K={k} a multiple "
                         f"of the blocksize {blocksize})")
    _validate(tiles, kind, m, n, k)


_PARAMS = pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary"))


def _dot(a, b, contract_b: int):
    """``a [m, c] . b`` over ``b``'s dim ``contract_b`` (0: NN ``a @ b``, 1: NT ``a @ b.T``), float32."""
    return jax.lax.dot_general(a, b, (((1,), (contract_b,)), ((), ())), preferred_element_type=jnp.float32)


def _expand_scales(s, t, *, blocksize: int, bk: int):
    """``s [rows, K/bs]`` -> ``[rows, bk/2]``: the scale of each packed column of K tile ``t``."""
    shape = (s.shape[1], bk // 2)
    lo = jax.lax.broadcasted_iota(jnp.int32, shape, 0) * blocksize - t * bk  # block b's first k, tile-relative
    k2 = jax.lax.broadcasted_iota(jnp.int32, shape, 1) * 2
    e = jnp.where((k2 >= lo) & (k2 < lo + blocksize), 1.0, 0.0).astype(jnp.float32)
    return jax.lax.dot_general(s, e, (((1,), (0,)), ((), ())), precision=jax.lax.Precision.HIGHEST,
                               preferred_element_type=jnp.float32)


def _weight_halves(c_ref, s_ref, t, *, kind, table, blocksize, bk, cdt):
    """Dequantized (even-k, odd-k) halves ``[bn, bk/2]`` of a packed codes tile, in ``cdt``."""
    s = _expand_scales(s_ref[...], t, blocksize=blocksize, bk=bk)
    hi, lo = dequant_halves(c_ref[...], kind, table)
    return (hi * s).astype(cdt), (lo * s).astype(cdt)


def _int8_weight(c_ref, cdt):
    return c_ref[...].astype(jnp.int32).astype(jnp.float32).astype(cdt)


def _forward_kernel(*refs, kind, table, blocksize, bk, lora, scale, cdt):
    nx = 1 if kind == "int8" else 2
    xs, (c_ref, s_ref), rest = refs[:nx], refs[nx:nx + 2], refs[nx + 2:]
    (xa_ref, b_ref), (o_ref, acc_ref) = (rest[:2], rest[2:]) if lora else ((None, None), rest)
    t = pl.program_id(2)

    @pl.when(t == 0)
    def _():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    if kind == "int8":
        acc_ref[...] += _dot(xs[0][...], _int8_weight(c_ref, cdt), 1)
    else:
        w_even, w_odd = _weight_halves(c_ref, s_ref, t, kind=kind, table=table, blocksize=blocksize, bk=bk, cdt=cdt)
        acc_ref[...] += _dot(xs[0][...], w_even, 1) + _dot(xs[1][...], w_odd, 1)

    @pl.when(t == pl.num_programs(2) - 1)
    def _():
        out = acc_ref[...]
        if kind == "int8":
            out = out * s_ref[...]  # [1, bn]: the row scale of each output column
        if lora:
            out = out + scale * _dot(xa_ref[...], b_ref[...], 0)
        o_ref[...] = out.astype(o_ref.dtype)


def _transposed_kernel(dy_ref, c_ref, s_ref, *rest, kind, table, blocksize, bk, cdt):
    nout = 1 if kind == "int8" else 2
    outs, accs = rest[:nout], rest[nout:]
    t, step = pl.program_id(1), pl.program_id(2)  # K tile, N step (the reduction)

    @pl.when(step == 0)
    def _():
        for acc in accs:
            acc[...] = jnp.zeros_like(acc)

    if kind == "int8":
        dy = (dy_ref[...].astype(jnp.float32) * s_ref[...]).astype(cdt)  # row scales of W scale dy's columns
        accs[0][...] += _dot(dy, _int8_weight(c_ref, cdt), 0)
    else:
        dy = dy_ref[...].astype(cdt)
        w_even, w_odd = _weight_halves(c_ref, s_ref, t, kind=kind, table=table, blocksize=blocksize, bk=bk, cdt=cdt)
        accs[0][...] += _dot(dy, w_even, 0)
        accs[1][...] += _dot(dy, w_odd, 0)

    @pl.when(step == pl.num_programs(2) - 1)
    def _():
        for o, acc in zip(outs, accs):
            o[...] = acc[...].astype(o.dtype)


def _padded_weight(codes, scales, kind, blocksize, n, np_, kp):
    """Codes as int8 ``[Np, Kp(/2)]`` and scales ``[Np, Kp/bs]`` (4-bit) or ``[1, Np]`` (int8), zero-padded."""
    codes = jax.lax.bitcast_convert_type(codes, jnp.int8) if codes.dtype == jnp.uint8 else codes
    if kind == "int8":
        return pad_to(codes, (np_, kp)), pad_to(scales.astype(jnp.float32).reshape(1, n), (1, np_))
    return pad_to(codes, (np_, kp // 2)), pad_to(scales.astype(jnp.float32), (np_, -(-kp // blocksize)))


def forward(x: jax.Array, codes: jax.Array, scales: jax.Array, *, kind: str, blocksize: int, n: int,
            table: tuple[float, ...] = (), xa: Optional[jax.Array] = None, b: Optional[jax.Array] = None,
            lora_scale: float = 1.0, tiles: Optional[TpuTiles] = None, out_dtype=None,
            interpret: bool | pltpu.InterpretParams = False) -> jax.Array:
    """``x [M, K] @ dequant(codes)^T`` (+ ``lora_scale * xa [M, r] @ b [r, N]``) -> ``[M, N]``.

    ``scales``: float32 ``[N, K/blocksize]`` (nf4 / fp4 / int4) or ``[N]`` (int8, absmax / 127
    applied); ``table``: the 16 code values of nf4 / fp4; operands are multiplied in ``x.dtype``."""
    m, k = x.shape
    table = tuple(float(v) for v in table)
    tiles = tiles or tiles_for(m, n, k, kind, blocksize)
    _check_all(kind, table, blocksize, codes, scales, n, k, tiles, m)
    cdt, out_dtype = x.dtype, out_dtype or x.dtype
    bm, bn, bk = tiles.bm, tiles.bn, tiles.bk
    mp, np_, kp = round_up(m, bm), round_up(n, bn), round_up(k, bk)
    cp, sp = _padded_weight(codes, scales, kind, blocksize, n, np_, kp)
    xp = pad_to(x, (mp, kp))
    if kind == "int8":
        args, in_specs = [xp], [pl.BlockSpec((bm, bk), lambda i, j, t: (i, t))]
        in_specs += [pl.BlockSpec((bn, bk), lambda i, j, t: (j, t)), pl.BlockSpec((1, bn), lambda i, j, t: (0, j))]
    else:
        args = [xp[:, 0::2], xp[:, 1::2]]
        in_specs = [pl.BlockSpec((bm, bk // 2), lambda i, j, t: (i, t))] * 2
        in_specs += [pl.BlockSpec((bn, bk // 2), lambda i, j, t: (j, t)),
                     pl.BlockSpec((bn, sp.shape[1]), lambda i, j, t: (j, 0))]
    args += [cp, sp]
    lora = xa is not None
    if lora:
        rp = round_up(xa.shape[1], LANE)
        args += [pad_to(xa.astype(cdt), (mp, rp)), pad_to(b.astype(cdt), (rp, np_))]
        in_specs += [pl.BlockSpec((bm, rp), lambda i, j, t: (i, 0)), pl.BlockSpec((rp, bn), lambda i, j, t: (0, j))]
    kernel = functools.partial(_forward_kernel, kind=kind, table=table, blocksize=blocksize, bk=bk, lora=lora,
                               scale=float(lora_scale), cdt=cdt)
    out = pl.pallas_call(
        kernel, out_shape=jax.ShapeDtypeStruct((mp, np_), out_dtype), grid=(mp // bm, np_ // bn, kp // bk),
        in_specs=in_specs, out_specs=pl.BlockSpec((bm, bn), lambda i, j, t: (i, j)),
        scratch_shapes=[pltpu.VMEM((bm, bn), jnp.float32)], compiler_params=_PARAMS,
        interpret=interpret, name=f"{kind}_matmul_tpu",
    )(*args)
    return out[:m, :n]


def transposed(dy: jax.Array, codes: jax.Array, scales: jax.Array, *, kind: str, blocksize: int, k: int,
               table: tuple[float, ...] = (), tiles: Optional[TpuTiles] = None, out_dtype=None,
               interpret: bool | pltpu.InterpretParams = False) -> jax.Array:
    """``dy [M, N] @ dequant(codes) [N, K]`` -> ``[M, K]`` (the input gradient of `forward`). Tiles:
    ``bm`` over M, ``bk`` over K (the output), ``bn`` over N (the reduction)."""
    m, n = dy.shape
    table = tuple(float(v) for v in table)
    tiles = tiles or tiles_for(m, n, k, kind, blocksize)
    _check_all(kind, table, blocksize, codes, scales, n, k, tiles, m)
    cdt, out_dtype = dy.dtype, out_dtype or dy.dtype
    bm, bn, bk = tiles.bm, tiles.bn, tiles.bk
    mp, np_, kp = round_up(m, bm), round_up(n, bn), round_up(k, bk)
    cp, sp = _padded_weight(codes, scales, kind, blocksize, n, np_, kp)
    dy_spec = pl.BlockSpec((bm, bn), lambda i, t, s: (i, s))
    if kind == "int8":
        in_specs = [dy_spec, pl.BlockSpec((bn, bk), lambda i, t, s: (s, t)),
                    pl.BlockSpec((1, bn), lambda i, t, s: (0, s))]
        width = bk
    else:
        in_specs = [dy_spec, pl.BlockSpec((bn, bk // 2), lambda i, t, s: (s, t)),
                    pl.BlockSpec((bn, sp.shape[1]), lambda i, t, s: (s, 0))]
        width = bk // 2
    nout = 1 if kind == "int8" else 2
    kernel = functools.partial(_transposed_kernel, kind=kind, table=table, blocksize=blocksize, bk=bk, cdt=cdt)
    outs = pl.pallas_call(
        kernel, out_shape=[jax.ShapeDtypeStruct((mp, kp * width // bk), out_dtype)] * nout,
        grid=(mp // bm, kp // bk, np_ // bn), in_specs=in_specs,
        out_specs=[pl.BlockSpec((bm, width), lambda i, t, s: (i, t))] * nout,
        scratch_shapes=[pltpu.VMEM((bm, width), jnp.float32)] * nout, compiler_params=_PARAMS,
        interpret=interpret, name=f"{kind}_matmul_t_tpu",
    )(pad_to(dy, (mp, np_)), cp, sp)
    dx = outs[0] if kind == "int8" else jnp.stack(outs, axis=-1).reshape(mp, kp)  # interleave even / odd
    return dx[:m, :k]

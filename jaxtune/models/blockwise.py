"""Blockwise attention with its own backward pass, in pure JAX: O(length) memory on every backend.

The forward pass walks key/value blocks with an online softmax (running max ``m``, normaliser
``l``, float32 accumulator) and keeps only the output and the log-sum-exp of each query; the
backward pass recomputes each block's probabilities from them (``P = exp(S - lse)``) and forms
``dV = Pᵀ dO``, ``dS = P ∘ (dO Vᵀ - rowsum(dO ∘ O))``, ``dQ = dS K``, ``dK = dSᵀ Q``. Nothing of
size [queries, keys] is kept between the two.

Masks are never materialised beyond one [batch, block_q, block_kv] tile: each tile's visibility
comes from the per-token `MaskInfo` (segment ids, slot indices, causality, sliding window, the
prefix-tuning key columns), and a tile nobody sees (the causal upper triangle, another packed
document, cache slots not yet written) is skipped with ``lax.cond``. Grouped-query attention
runs heads-major, ``[batch, kv_heads, groups, block, head_dim]``: K/V are never repeated, and every
matmul is a batched GEMM over (batch, kv_heads) contracting the last dimension or the block one.

Lengths that no block size divides are padded (padding queries and keys are masked) and cut
back. A query that sees no key at all (a padding row) gets a zero output and zero gradients.

`gathered_attention` is the same computation for one device's block of a sequence split over a
mesh axis (context parallelism, `jaxtune.models.context_attention`): its keys / values are
all-gathered over the axis in the forward pass and gathered again in the backward pass (only the
local block is kept in between), and dK / dV are reduce-scattered back to their blocks.
"""

from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp

from jaxtune.models.masks import MaskInfo

_BIG = 1e30  # a padding row's lse: exp(s - _BIG) is 0 for any finite score
TILE_BUDGET = 2**21  # scores per tile (batch x heads x block_q x block_kv) when the blocks are left to choose
MIN_BLOCK = 64


def choose_blocks(batch: int, heads: int, q_len: int, kv_len: int) -> tuple[int, int]:
    """The largest power-of-two tiles (>= 64) whose scores fit `TILE_BUDGET`, square while both
    sequences allow it: on this CPU the fastest sizes measured (README: 128 at 16 x 256 tokens, 256 at
    4 x 1024 and 2 x 2048). A few queries against a long cache (decoding) take one query tile and
    key tiles as long as the budget allows."""
    bq = bk = MIN_BLOCK
    while batch * heads * (2 * bq) * (2 * bk) <= TILE_BUDGET and 2 * bq <= q_len and 2 * bk <= kv_len:
        bq, bk = 2 * bq, 2 * bk
    if q_len < bq:
        bq = q_len
        while batch * heads * bq * 2 * bk <= TILE_BUDGET and 2 * bk <= kv_len:
            bk *= 2
    return bq, bk


def blockwise_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: MaskInfo, *, block_q: int = 0,
                        block_kv: int = 0) -> jax.Array:
    """q: [batch, q_len, heads, head_dim]; k, v: [batch, num_prefix + kv_len, kv_heads, head_dim]
    (the prefix columns first) -> [batch, q_len, heads, head_dim]. ``block_q`` / ``block_kv``: the
    tile (0: `choose_blocks`); a tile larger than the sequence is cut to it."""
    batch, q_len, heads, head_dim = q.shape
    kv_heads, kv_len = k.shape[2], max(k.shape[1] - mask.num_prefix, 1)
    if heads % kv_heads:
        raise ValueError(f"attention: {heads} query heads do not divide into {kv_heads} key/value heads")
    return _attention(q, k, v, mask, *_blocks(batch, heads, q_len, kv_len, block_q, block_kv))


def _blocks(batch: int, heads: int, q_len: int, kv_len: int, block_q: int, block_kv: int) -> tuple[int, int]:
    auto_q, auto_kv = choose_blocks(batch, heads, q_len, kv_len)
    return min(block_q or auto_q, q_len), min(block_kv or auto_kv, kv_len)


def gathered_attention(q: jax.Array, prefix_k: jax.Array, prefix_v: jax.Array, k: jax.Array, v: jax.Array,
                       mask: MaskInfo, axis_name: str, *, block_q: int = 0, block_kv: int = 0) -> jax.Array:
    """Blockwise attention of this device's queries against the whole sequence's keys, inside
    ``shard_map`` over ``axis_name``. q: [batch, q_len, heads, head_dim], this device's block;
    prefix_k, prefix_v: [batch, num_prefix, kv_heads, head_dim] (num_prefix may be 0), the same on
    every device of the axis; k, v: [batch, kv_len / axis size, kv_heads, head_dim], this device's
    block, all-gathered (tiled, in axis order) after the prefix. ``mask`` holds this device's
    queries (q_segments, q_index: their global slots) and every key (k_segments, k_index).

    The gathered K/V are not kept for the backward pass: it gathers them again, and the gradients
    of the local blocks are the reduce-scatter (``psum_scatter``) of the gathered ones. The prefix's
    gradient is this device's share (``shard_map``'s transpose sums it over the axis)."""
    batch, q_len, heads, _ = q.shape
    if heads % k.shape[2]:
        raise ValueError(f"attention: {heads} query heads do not divide into {k.shape[2]} key/value heads")
    kv_len = max(mask.k_segments.shape[1], 1)
    return _gathered(q, prefix_k, prefix_v, k, v, mask, *_blocks(batch, heads, q_len, kv_len, block_q, block_kv),
                     axis_name)


def _gather(prefix_k, prefix_v, k, v, axis_name):
    whole = lambda x: jax.lax.all_gather(x, axis_name, axis=1, tiled=True)  # noqa: E731
    return jnp.concatenate([prefix_k, whole(k)], axis=1), jnp.concatenate([prefix_v, whole(v)], axis=1)


@partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8))
def _gathered(q, prefix_k, prefix_v, k, v, mask, bq, bk, axis_name):
    return _forward(q, *_gather(prefix_k, prefix_v, k, v, axis_name), mask, bq, bk)[0]


def _gathered_fwd(q, prefix_k, prefix_v, k, v, mask, bq, bk, axis_name):
    result, (_, lse) = _forward(q, *_gather(prefix_k, prefix_v, k, v, axis_name), mask, bq, bk)
    return result, (q, prefix_k, prefix_v, k, v, mask, result, lse)


def _gathered_bwd(bq, bk, axis_name, residuals, d_out):
    q, prefix_k, prefix_v, k, v, mask, result, lse = residuals
    k_all, v_all = _gather(prefix_k, prefix_v, k, v, axis_name)
    dq, dk, dv, d_mask = _backward(_Tiles.of(q, k_all, v_all, mask, bq, bk), result, lse, d_out)
    n = prefix_k.shape[1]
    # Summed over the axis in float32 (each device's share is a partial sum over its queries).
    scatter = lambda x: jax.lax.psum_scatter(x, axis_name, scatter_dimension=1, tiled=True)  # noqa: E731
    return (dq, dk[:, :n].astype(prefix_k.dtype), dv[:, :n].astype(prefix_v.dtype),
            scatter(dk[:, n:]).astype(k.dtype), scatter(dv[:, n:]).astype(v.dtype), d_mask)


@partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _attention(q, k, v, mask, bq, bk):
    return _forward(q, k, v, mask, bq, bk)[0]


def _heads_major(q, k, v, kv_heads):
    """[B, L, H, D] -> q [B, KVH, G, L, D]; k, v [B, KVH, L, D]."""
    b, lq, h, d = q.shape
    qh = q.reshape(b, lq, kv_heads, h // kv_heads, d).transpose(0, 2, 3, 1, 4)
    return qh, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)


def _pad_to(x, axis, size, mode="constant"):
    """``x`` padded along ``axis`` to ``size``: zeros (``constant``) or its last value (``edge``)."""
    extra = size - x.shape[axis]
    if extra == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths, mode=mode)


class _Tiles:
    """The padded, heads-major operands and the per-token mask inputs, cut into tiles. Built from
    the attention's inputs (`_Tiles.of`) or from its own operands (``operands``, what the forward
    pass keeps for the backward: the backward then transposes and pads nothing of its own, so no
    second heads-major copy of Q / K / V is live between the passes)."""

    def __init__(self, qh, kh, vh, prefix_k, prefix_v, mask: MaskInfo, bq: int, bk: int):
        self.mask, self.bq, self.bk = mask, bq, bk
        self.n = mask.num_prefix
        self.q_len, self.kv_len = mask.q_segments.shape[1], mask.k_segments.shape[1]
        self.nq, self.nk = qh.shape[3] // bq, kh.shape[2] // bk
        self.qh, self.kh, self.vh, self.prefix_k, self.prefix_v = qh, kh, vh, prefix_k, prefix_v
        self.q_seg = _pad_to(mask.q_segments, 1, self.nq * bq)
        self.k_seg = _pad_to(mask.k_segments, 1, self.nk * bk)
        self.q_idx = _pad_to(mask.q_index, 0, self.nq * bq, "edge")  # padding slots: segment 0, any index
        self.k_idx = _pad_to(mask.k_index, 0, self.nk * bk, "edge")
        self.q_pos = None if mask.q_positions is None else _pad_to(mask.q_positions, 1, self.nq * bq)
        self.scale = 1.0 / math.sqrt(qh.shape[-1])

    @classmethod
    def of(cls, q, k, v, mask: MaskInfo, bq: int, bk: int) -> "_Tiles":
        n = mask.num_prefix
        nq, nk = -(-q.shape[1] // bq), -(-max(k.shape[1] - n, 1) // bk)
        qh, kh, vh = _heads_major(q, k, v, k.shape[2])
        return cls(_pad_to(qh, 3, nq * bq), _pad_to(kh[:, :, n:], 2, nk * bk), _pad_to(vh[:, :, n:], 2, nk * bk),
                   kh[:, :, :n], vh[:, :, :n], mask, bq, bk)

    @property
    def operands(self) -> tuple:
        return self.qh, self.kh, self.vh, self.prefix_k, self.prefix_v

    def q_tile(self, x, i):
        """Rows ``i*bq .. (i+1)*bq`` of a [B, KVH, G, Lq, ...] array."""
        return jax.lax.dynamic_slice_in_dim(x, i * self.bq, self.bq, axis=3)

    def kv_tile(self, x, j):
        return jax.lax.dynamic_slice_in_dim(x, j * self.bk, self.bk, axis=2)

    def visible(self, i, j):
        """[B, bq, bk] bool: which keys of tile j the queries of tile i see."""
        qs = jax.lax.dynamic_slice_in_dim(self.q_seg, i * self.bq, self.bq, axis=1)
        ks = jax.lax.dynamic_slice_in_dim(self.k_seg, j * self.bk, self.bk, axis=1)
        qi = jax.lax.dynamic_slice_in_dim(self.q_idx, i * self.bq, self.bq)
        ki = jax.lax.dynamic_slice_in_dim(self.k_idx, j * self.bk, self.bk)
        return self.mask.tile(qs, qi, ks, ki)

    def table(self) -> jax.Array:
        """[nq, nk] bool: tiles some query sees some key of (conservatively: segment ranges that
        overlap in a row, slot ranges that the causal / window rule lets meet). One reduction over
        the batch for every tile, made before the loops: with the batch sharded over devices, one
        collective, not one per tile."""
        def ranges(seg, n, b):  # per row and tile: smallest and largest non-zero segment id
            tiles = seg.reshape(seg.shape[0], n, b)
            real = tiles != 0
            big = jnp.iinfo(jnp.int32).max
            return jnp.min(jnp.where(real, tiles, big), -1), jnp.max(jnp.where(real, tiles, -big), -1)

        q_lo, q_hi = ranges(self.q_seg, self.nq, self.bq)  # [B, nq]
        k_lo, k_hi = ranges(self.k_seg, self.nk, self.bk)  # [B, nk]
        shared = jnp.any((q_lo[:, :, None] <= k_hi[:, None, :]) & (k_lo[:, None, :] <= q_hi[:, :, None]), axis=0)
        qi = self.q_idx.reshape(self.nq, self.bq)
        ki = self.k_idx.reshape(self.nk, self.bk)
        qi_lo, qi_hi = qi.min(-1)[:, None], qi.max(-1)[:, None]
        ki_lo, ki_hi = ki.min(-1)[None, :], ki.max(-1)[None, :]
        mask = self.mask
        if mask.causal:
            meet = ki_lo <= qi_hi
            if mask.window is not None:
                meet = meet & (ki_hi > qi_lo - mask.window)
        elif mask.window is not None:
            meet = (ki_lo < qi_hi + mask.window) & (ki_hi > qi_lo - mask.window)
        else:
            meet = jnp.ones((self.nq, self.nk), bool)
        return shared & meet

    def prefix_visible(self, i):
        qs = jax.lax.dynamic_slice_in_dim(self.q_seg, i * self.bq, self.bq, axis=1)
        qp = None if self.q_pos is None else jax.lax.dynamic_slice_in_dim(self.q_pos, i * self.bq, self.bq, axis=1)
        return self.mask.prefix_tile(qs, qp)


def _fori(n: int, body, carry):
    """``lax.fori_loop`` over ``n`` tiles; one tile runs inline (no loop to compile or dispatch)."""
    return body(0, carry) if n == 1 else jax.lax.fori_loop(0, n, body, carry)


def _if_visible(seen, fn, carry):
    """``fn(carry)`` where the tile table says a query sees a key of the tile, else ``carry``
    (``lax.cond``: the tile's matmuls are skipped); None (a single tile) always runs."""
    if seen is None:
        return fn(carry)
    return jax.lax.cond(seen, fn, lambda c: c, carry)


def _scan(fn, n: int):
    """``lax.scan(fn)`` over ``n`` tile indices, stacked outputs; one tile runs inline."""
    if n == 1:
        return jax.tree.map(lambda x: x[None], fn(None, 0)[1])
    return jax.lax.scan(fn, None, jnp.arange(n))[1]


def _scores(tiles: _Tiles, qb, kb, visible):
    """Scaled float32 scores [B, KVH, G, bq, bk], -inf where not visible."""
    s = jnp.einsum("bkgqd,bksd->bkgqs", qb, kb, preferred_element_type=jnp.float32) * tiles.scale
    return jnp.where(visible[:, None, None], s, -jnp.inf)


def _forward(q, k, v, mask, bq, bk):
    return _forward_tiles(_Tiles.of(q, k, v, mask, bq, bk))


def _forward_tiles(tiles: _Tiles):
    """-> (result [B, Lq, H, D] in Q's dtype, (out heads-major, lse [B, KVH, G, nq*bq]))."""
    batch, kvh, groups, _, d = tiles.qh.shape
    bq, dtype = tiles.bq, tiles.qh.dtype

    def online(carry, kb, vb, visible, qb):
        m, l, acc = carry
        s = _scores(tiles, qb, kb, visible)
        m_new = jnp.maximum(m, jnp.max(s, axis=-1))
        m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
        p = jnp.exp(s - m_safe[..., None])
        corr = jnp.exp(m - m_safe)
        acc = acc * corr[..., None] + jnp.einsum("bkgqs,bksd->bkgqd", p.astype(vb.dtype), vb,
                                                 preferred_element_type=jnp.float32)
        return m_new, l * corr + jnp.sum(p, axis=-1), acc

    table = tiles.table() if tiles.nk > 1 else None

    def q_block(_, i):
        qb = tiles.q_tile(tiles.qh, i)
        shape = (batch, kvh, groups, bq)
        carry = (jnp.full(shape, -jnp.inf, jnp.float32), jnp.zeros(shape, jnp.float32),
                 jnp.zeros(shape + (d,), jnp.float32))
        if tiles.n:
            carry = online(carry, tiles.prefix_k, tiles.prefix_v, tiles.prefix_visible(i), qb)

        def kv_block(j, carry):
            visible = tiles.visible(i, j)
            return _if_visible(None if table is None else table[i, j],
                               lambda c: online(c, tiles.kv_tile(tiles.kh, j), tiles.kv_tile(tiles.vh, j), visible, qb),
                               carry)

        m, l, acc = _fori(tiles.nk, kv_block, carry)
        seen = l > 0
        out = acc / jnp.where(seen, l, 1.0)[..., None]
        lse = jnp.where(seen, jnp.where(jnp.isfinite(m), m, 0.0) + jnp.log(jnp.where(seen, l, 1.0)), _BIG)
        return None, (out.astype(dtype), lse)

    out, lse = _scan(q_block, tiles.nq)
    # [nq, B, KVH, G, bq, ...] -> [B, KVH, G, nq*bq, ...]
    out = jnp.moveaxis(out, 0, 3).reshape(batch, kvh, groups, tiles.nq * bq, d)
    lse = jnp.moveaxis(lse, 0, 3).reshape(batch, kvh, groups, tiles.nq * bq)
    result = out[:, :, :, : tiles.q_len].transpose(0, 3, 1, 2, 4).reshape(batch, tiles.q_len, kvh * groups, d)
    return result, (out, lse)


def _fwd(q, k, v, mask, bq, bk):
    tiles = _Tiles.of(q, k, v, mask, bq, bk)
    result, (_, lse) = _forward_tiles(tiles)
    # the heads-major operands the forward pass made (not Q / K / V again) and the output once, in
    # the layout the next layer reads
    return result, (tiles.operands, mask, result, lse)


def _bwd(bq, bk, residuals, d_out):
    operands, mask, result, lse = residuals
    dq, dk, dv, d_mask = _backward(_Tiles(*operands, mask, bq, bk), result, lse, d_out)
    return dq, dk.astype(operands[1].dtype), dv.astype(operands[2].dtype), d_mask


def _backward(tiles: _Tiles, result, lse, d_out):
    """dQ (in Q's dtype), dK and dV (float32, as accumulated), the mask's zero cotangent."""
    mask, bq, bk = tiles.mask, tiles.bq, tiles.bk
    batch, kvh, groups, _, d = tiles.qh.shape
    do = _pad_to(d_out.reshape(batch, tiles.q_len, kvh, groups, d).transpose(0, 2, 3, 1, 4), 3, tiles.nq * bq)
    delta = jnp.sum(d_out.astype(jnp.float32) * result.astype(jnp.float32), axis=-1)  # [B, Lq, H]
    delta = _pad_to(delta.reshape(batch, tiles.q_len, kvh, groups).transpose(0, 2, 3, 1), 3, tiles.nq * bq)
    # dK and dV contract over the queries: with Q and dO feature-major ([B, KVH, D, G, Lq], transposed
    # once here) both are plain GEMMs against the probabilities' own layout, accumulated transposed
    # ([B, KVH, D, bk]); nothing of the [queries, keys] size is ever transposed.
    qt, dot = tiles.qh.transpose(0, 1, 4, 2, 3), do.transpose(0, 1, 4, 2, 3)

    def grads(kb, vb, visible, i, dq):
        """One tile's contributions: dKᵀ, dVᵀ of the tile, and dQ added into rows i."""
        qb, dob = tiles.q_tile(tiles.qh, i), tiles.q_tile(do, i)
        qtb = jax.lax.dynamic_slice_in_dim(qt, i * bq, bq, axis=4)
        dotb = jax.lax.dynamic_slice_in_dim(dot, i * bq, bq, axis=4)
        p = jnp.exp(_scores(tiles, qb, kb, visible) - tiles.q_tile(lse, i)[..., None])
        dvt = jnp.einsum("bkdgq,bkgqs->bkds", dotb, p.astype(dob.dtype), preferred_element_type=jnp.float32)
        dp = jnp.einsum("bkgqd,bksd->bkgqs", dob, vb, preferred_element_type=jnp.float32)
        ds = (p * (dp - tiles.q_tile(delta, i)[..., None])) * tiles.scale
        dkt = jnp.einsum("bkdgq,bkgqs->bkds", qtb, ds.astype(qb.dtype), preferred_element_type=jnp.float32)
        dq_i = jnp.einsum("bkgqs,bksd->bkgqd", ds.astype(kb.dtype), kb, preferred_element_type=jnp.float32)
        dq = jax.lax.dynamic_update_slice_in_dim(dq, tiles.q_tile(dq, i) + dq_i, i * bq, axis=3)
        return dkt, dvt, dq

    table = tiles.table() if tiles.nq > 1 else None

    def accumulate(kb, vb, visible_of, seen_of, dq):
        """dKᵀ, dVᵀ [B, KVH, D, keys] of one key block over every query tile that sees it."""
        def q_block(i, carry):
            dkt, dvt, dq = carry
            visible = visible_of(i)

            def add(c):
                dk_i, dv_i, dq = grads(kb, vb, visible, i, c[2])
                return c[0] + dk_i, c[1] + dv_i, dq

            return _if_visible(seen_of(i), add, (dkt, dvt, dq))

        zeros = jnp.zeros((batch, kvh, d, kb.shape[2]), jnp.float32)
        return _fori(tiles.nq, q_block, (zeros, zeros, dq))

    def kv_block(dq, j):
        dkt, dvt, dq = accumulate(tiles.kv_tile(tiles.kh, j), tiles.kv_tile(tiles.vh, j),
                                  lambda i: tiles.visible(i, j), lambda i: None if table is None else table[i, j], dq)
        return dq, (dkt, dvt)

    dq = jnp.zeros(tiles.qh.shape, jnp.float32)
    if tiles.nk == 1:
        dq, (dkt, dvt) = kv_block(dq, 0)
        dkt, dvt = dkt[None], dvt[None]
    else:
        dq, (dkt, dvt) = jax.lax.scan(kv_block, dq, jnp.arange(tiles.nk))
    # [nk, B, KVH, D, bk] -> [B, KVH, D, nk*bk]
    dkt = jnp.moveaxis(dkt, 0, 3).reshape(batch, kvh, d, tiles.nk * bk)[..., : tiles.kv_len]
    dvt = jnp.moveaxis(dvt, 0, 3).reshape(batch, kvh, d, tiles.nk * bk)[..., : tiles.kv_len]
    if tiles.n:
        dkt_p, dvt_p, dq = accumulate(tiles.prefix_k, tiles.prefix_v, tiles.prefix_visible, lambda i: None, dq)
        dkt, dvt = jnp.concatenate([dkt_p, dkt], axis=-1), jnp.concatenate([dvt_p, dvt], axis=-1)
    dq = dq[:, :, :, : tiles.q_len].transpose(0, 3, 1, 2, 4).reshape(d_out.shape).astype(tiles.qh.dtype)
    dk = dkt.transpose(0, 3, 1, 2)  # [B, KVH, D, L] -> [B, L, KVH, D]
    dv = dvt.transpose(0, 3, 1, 2)
    return dq, dk, dv, jax.tree.map(_zero_cotangent, mask)


def _zero_cotangent(x):
    return jnp.zeros(x.shape, jax.dtypes.float0) if not jnp.issubdtype(x.dtype, jnp.inexact) else jnp.zeros_like(x)


_attention.defvjp(_fwd, _bwd)
_gathered.defvjp(_gathered_fwd, _gathered_bwd)

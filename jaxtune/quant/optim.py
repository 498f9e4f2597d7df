"""8-bit Adam: Adam's moments held blockwise-quantized, as an optax transformation.

`scale_by_adam_8bit` keeps, for every parameter with at least ``min_8bit_size`` elements, the
first moment as uint8 codes of the signed dynamic map and the second as codes of the unsigned
dynamic map (Dettmers et al., "8-bit Optimizers via Block-wise Quantization", 2022; the maps and
blocks of 256 are bitsandbytes'), one float32 absmax per block: ~2 bytes per parameter instead
of 8. Each step dequantizes, applies the ordinary Adam update in float32 and quantizes again,
one leaf at a time and, for leaves above 2^20 elements, one chunk of 2^20 at a time, so the
float32 moments never exist for more than that many parameters at once.
Smaller parameters (norm scales, biases) keep float32 moments, as bitsandbytes does.

State layout (`Adam8bitState`): ``mu`` / ``nu`` have the parameter tree's structure, each leaf
either uint8 codes of the parameter's shape (flattened row-major into blocks) or the float32
moment itself; ``mu_absmax`` / ``nu_absmax`` likewise hold ``[ceil(size / 256)]`` absmax per
8-bit leaf (one unused zero for float32 leaves). Because codes keep the parameter's shape, the
loop shards them exactly like the parameter.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxtune.quant import codes as C

BLOCKSIZE = 256


class Adam8bitState(NamedTuple):
    count: jax.Array
    mu: Any
    nu: Any
    mu_absmax: Any
    nu_absmax: Any


def _is_8bit(x, min_8bit_size: int) -> bool:
    return x.size >= min_8bit_size


def _encode(x: jax.Array, signed: bool) -> tuple[jax.Array, jax.Array]:
    code = C.DYNAMIC_SIGNED if signed else C.DYNAMIC_UNSIGNED
    codes, absmax = C.quantize_blockwise(x.reshape(-1).astype(jnp.float32), BLOCKSIZE, code)
    return codes.reshape(x.shape), absmax


def _decode(codes: jax.Array, absmax: jax.Array, signed: bool) -> jax.Array:
    code = C.DYNAMIC_SIGNED if signed else C.DYNAMIC_UNSIGNED
    return C.dequantize_blockwise(codes.reshape(-1), absmax, BLOCKSIZE, code).reshape(codes.shape)


CHUNK = 2**20  # leaves above this many elements are updated this many at a time
_ZERO_CODE = {True: int(np.argmin(np.abs(C.DYNAMIC_SIGNED))), False: int(np.argmin(np.abs(C.DYNAMIC_UNSIGNED)))}


def _chunked(update, g, m_q, v_q, m_a, v_a):
    """``update`` over a large leaf in chunks of `CHUNK` elements (a ``lax.scan``), so the float32
    moments of one chunk exist at a time rather than the whole leaf's. Padding takes the code of
    0.0, so a partly filled last block keeps its absmax."""
    n, blocks = g.size, m_a.shape[0]
    n_chunks = -(-n // CHUNK)
    pad = n_chunks * CHUNK - n
    zero_m, zero_v = _ZERO_CODE[True], _ZERO_CODE[False]

    def rows(x, fill):
        return jnp.pad(x.reshape(-1), (0, pad), constant_values=fill).reshape(n_chunks, CHUNK)

    def absmax_rows(a):
        return jnp.pad(a, (0, n_chunks * CHUNK // BLOCKSIZE - blocks)).reshape(n_chunks, CHUNK // BLOCKSIZE)

    xs = (rows(g, 0), rows(m_q, zero_m), rows(v_q, zero_v), absmax_rows(m_a), absmax_rows(v_a))
    _, (step, m_q, v_q, m_a, v_a) = jax.lax.scan(lambda carry, x: (carry, update(*x)), None, xs)
    flat = lambda x: x.reshape(-1)[:n].reshape(g.shape)  # noqa: E731
    return flat(step), flat(m_q), flat(v_q), m_a.reshape(-1)[:blocks], v_a.reshape(-1)[:blocks]


def scale_by_adam_8bit(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8, *,
                       min_8bit_size: int = 4096) -> optax.GradientTransformation:
    """Adam's preconditioning (as ``optax.scale_by_adam``) with 8-bit blockwise moments."""

    def init(params):
        def zeros(p, signed):
            if _is_8bit(p, min_8bit_size):  # the codes of 0.0 and a zero absmax: what _encode(zeros) gives
                blocks = -(-int(np.prod(p.shape)) // BLOCKSIZE)
                return jnp.full(p.shape, _ZERO_CODE[signed], jnp.uint8), jnp.zeros((blocks,), jnp.float32)
            return jnp.zeros(p.shape, jnp.float32), jnp.zeros((1,), jnp.float32)  # (unused; Orbax refuses empty arrays)

        mu = jax.tree.map(lambda p: zeros(p, True)[0], params)
        mu_absmax = jax.tree.map(lambda p: zeros(p, True)[1], params)
        nu = jax.tree.map(lambda p: zeros(p, False)[0], params)
        nu_absmax = jax.tree.map(lambda p: zeros(p, False)[1], params)
        return Adam8bitState(count=jnp.zeros([], jnp.int32), mu=mu, nu=nu, mu_absmax=mu_absmax, nu_absmax=nu_absmax)

    def update(updates, state, params=None):
        del params
        count = optax.safe_increment(state.count)
        t = count.astype(jnp.float32)

        def adam(g, m, v):
            g32 = g.astype(jnp.float32)
            m = b1 * m + (1.0 - b1) * g32
            v = b2 * v + (1.0 - b2) * jnp.square(g32)
            return (m / (1.0 - b1 ** t)) / (jnp.sqrt(v / (1.0 - b2 ** t)) + eps), m, v

        def blocks_8bit(g, m_q, v_q, m_a, v_a):  # flat arrays whose length is a multiple of BLOCKSIZE
            step, m, v = adam(g, _decode(m_q, m_a, True), _decode(v_q, v_a, False))
            (m_q, m_a), (v_q, v_a) = _encode(m, True), _encode(v, False)
            return step.astype(g.dtype), m_q, v_q, m_a, v_a

        def leaf(g, m_q, v_q, m_a, v_a):
            if m_q.dtype != jnp.uint8:
                step, m, v = adam(g, m_q, v_q)
                return step.astype(g.dtype), m, v, m_a, v_a
            if g.size <= CHUNK:
                step, m_q2, v_q2, m_a, v_a = blocks_8bit(g.reshape(-1), m_q.reshape(-1), v_q.reshape(-1), m_a, v_a)
                return step.reshape(g.shape), m_q2.reshape(g.shape), v_q2.reshape(g.shape), m_a, v_a
            return _chunked(blocks_8bit, g, m_q, v_q, m_a, v_a)

        treedef = jax.tree.structure(updates)
        columns = [treedef.flatten_up_to(t) for t in (updates, state.mu, state.nu, state.mu_absmax, state.nu_absmax)]
        out, previous = [], None
        for args in zip(*columns):
            if previous is not None and args[1].dtype == jnp.uint8:
                # One 8-bit leaf at a time: its float32 moments exist only while it is updated. Without
                # the barrier XLA may dequantize every leaf's moments at once, holding more memory than
                # float32 Adam would.
                args, _ = jax.lax.optimization_barrier((args, previous))
            result = leaf(*args)
            out.append(result)
            if args[1].dtype == jnp.uint8:
                previous = result[1:3]
        step, mu, nu, mu_absmax, nu_absmax = (jax.tree.unflatten(treedef, [o[i] for o in out]) for i in range(5))
        return step, Adam8bitState(count=count, mu=mu, nu=nu, mu_absmax=mu_absmax, nu_absmax=nu_absmax)

    return optax.GradientTransformation(init, update)


def adamw_8bit(learning_rate: optax.ScalarOrSchedule, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
               weight_decay: float = 0.0, mask: Optional[Any] = None, *,
               min_8bit_size: int = 4096) -> optax.GradientTransformation:
    """AdamW with 8-bit moments: `scale_by_adam_8bit`, decoupled weight decay, learning rate."""
    return optax.chain(
        scale_by_adam_8bit(b1, b2, eps, min_8bit_size=min_8bit_size),
        optax.add_decayed_weights(weight_decay, mask),
        optax.scale_by_learning_rate(learning_rate),
    )


def state_bytes(opt_state: Any) -> int:
    """Bytes held by an optimizer state (for comparing 8-bit and 32-bit moments)."""
    return sum(int(x.size) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(opt_state))

"""8-bit Adam: Adam's moments held blockwise-quantized, as an optax transformation.

`scale_by_adam_8bit` keeps, for every parameter with at least ``min_8bit_size`` elements, the
first moment as uint8 codes of the signed dynamic map and the second as codes of the unsigned
dynamic map (Dettmers et al., "8-bit Optimizers via Block-wise Quantization", 2022; the maps and
blocks of 256 are bitsandbytes'), one float32 absmax per block: ~2 bytes per parameter instead
of 8. Each step dequantizes, applies the ordinary Adam update in float32 and quantizes again.
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


def scale_by_adam_8bit(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8, *,
                       min_8bit_size: int = 4096) -> optax.GradientTransformation:
    """Adam's preconditioning (as ``optax.scale_by_adam``) with 8-bit blockwise moments."""

    def init(params):
        def zeros(p, signed):
            if _is_8bit(p, min_8bit_size):
                return _encode(jnp.zeros(p.shape, jnp.float32), signed)
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

        def leaf(g, m_q, v_q, m_a, v_a):
            quantized = m_q.dtype == jnp.uint8
            m = _decode(m_q, m_a, True) if quantized else m_q
            v = _decode(v_q, v_a, False) if quantized else v_q
            g32 = g.astype(jnp.float32)
            m = b1 * m + (1.0 - b1) * g32
            v = b2 * v + (1.0 - b2) * jnp.square(g32)
            step = (m / (1.0 - b1 ** t)) / (jnp.sqrt(v / (1.0 - b2 ** t)) + eps)
            if quantized:
                (m, m_a), (v, v_a) = _encode(m, True), _encode(v, False)
            return step.astype(g.dtype), m, v, m_a, v_a

        out = jax.tree.map(leaf, updates, state.mu, state.nu, state.mu_absmax, state.nu_absmax)
        treedef = jax.tree.structure(updates)
        parts = [jax.tree.unflatten(treedef, [o[i] for o in treedef.flatten_up_to(out)]) for i in range(5)]
        step, mu, nu, mu_absmax, nu_absmax = parts
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

"""RMSNorm and LayerNorm as functions with their own backward pass (`jax.custom_vjp`).

Both normalise in float32 and return ``out_dtype``. Differentiated by JAX, a norm keeps three
float32 copies of its input for the backward pass (the upcast, the normalised value, their
product with the scale): at 8,192 tokens of a 4096-wide model that is 384 MiB per norm and
three norms per block, more than the rest of the block's attention. Here the backward keeps
only the input (in its own dtype, usually already kept by the caller) and one float32 number
per row (the inverse RMS / standard deviation; LayerNorm also the mean), and rebuilds the
normalised value from them. The forward pass computes exactly what the plain formula does.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp


def _leading(x) -> tuple[int, ...]:
    """Every axis but the features: a scale's gradient sums over them in place (not over a
    flattened copy, which would gather a sequence split over devices)."""
    return tuple(range(x.ndim - 1))


def _rms_forward(x, scale, eps, out_dtype):
    x32 = x.astype(jnp.float32)
    inv = jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)
    return (x32 * inv * scale.astype(jnp.float32)).astype(out_dtype), inv


@partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def rms_norm(x: jax.Array, scale: jax.Array, eps: float, out_dtype) -> jax.Array:
    """x / sqrt(mean(x^2) + eps) * scale over the last axis, in float32, cast to ``out_dtype``."""
    return _rms_forward(x, scale, eps, out_dtype)[0]


def _rms_fwd(x, scale, eps, out_dtype):
    y, inv = _rms_forward(x, scale, eps, out_dtype)
    return y, (x, scale, inv)


def _rms_bwd(eps, out_dtype, residuals, g):
    # With n = x * inv: dx = inv * (g s - n mean(g s n)) = inv * g s - x * inv^3 mean(g s x), and
    # d_scale = sum over rows of inv * (g x). Written without forming n (or broadcasting inv to the
    # input's shape), nothing here is an expression the forward pass also computed, so the compiler
    # cannot merge the two and keep the forward's float32 intermediates alive until the backward.
    x, scale, inv = residuals
    x32, g32 = x.astype(jnp.float32), g.astype(jnp.float32)
    gs = g32 * scale.astype(jnp.float32)
    coeff = inv * inv * inv * jnp.mean(gs * x32, axis=-1, keepdims=True)
    dx = gs * inv - x32 * coeff
    d_scale = jnp.einsum("...d,...->d", g32 * x32, inv[..., 0])
    return dx.astype(x.dtype), d_scale.astype(scale.dtype)


rms_norm.defvjp(_rms_fwd, _rms_bwd)


def _layer_forward(x, scale, bias, eps, out_dtype):
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    inv = jax.lax.rsqrt(jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True) + eps)
    y = (x32 - mean) * inv * scale.astype(jnp.float32) + bias.astype(jnp.float32)
    return y.astype(out_dtype), mean, inv


@partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float, out_dtype) -> jax.Array:
    """(x - mean) / sqrt(var + eps) * scale + bias over the last axis, in float32, cast to ``out_dtype``."""
    return _layer_forward(x, scale, bias, eps, out_dtype)[0]


def _layer_fwd(x, scale, bias, eps, out_dtype):
    y, mean, inv = _layer_forward(x, scale, bias, eps, out_dtype)
    return y, (x, scale, bias, mean, inv)


def _layer_bwd(eps, out_dtype, residuals, g):
    x, scale, bias, mean, inv = residuals
    normed = (x.astype(jnp.float32) - mean) * inv
    g32 = g.astype(jnp.float32)
    d_normed = g32 * scale.astype(jnp.float32)
    dx = inv * (d_normed - jnp.mean(d_normed, axis=-1, keepdims=True)
                - normed * jnp.mean(d_normed * normed, axis=-1, keepdims=True))
    d_scale = jnp.sum(g32 * normed, axis=_leading(x))
    d_bias = jnp.sum(g32, axis=_leading(x))
    return dx.astype(x.dtype), d_scale.astype(scale.dtype), d_bias.astype(bias.dtype)


layer_norm.defvjp(_layer_fwd, _layer_bwd)

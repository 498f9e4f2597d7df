"""The norms' own backward passes against JAX differentiating the plain formulas, and what they keep."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxtune.models.norms import layer_norm, rms_norm
from jaxtune.train.memory import saved_activations


def plain_rms(x, scale, eps, out_dtype):
    x32 = x.astype(jnp.float32)
    return (x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, -1, keepdims=True) + eps) * scale.astype(jnp.float32)).astype(out_dtype)


def plain_layer(x, scale, bias, eps, out_dtype):
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, -1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(jnp.mean(jnp.square(x32 - mean), -1, keepdims=True) + eps)
    return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(out_dtype)


def _inputs(dtype, shape=(2, 5, 48)):
    keys = jax.random.split(jax.random.key(0), 4)
    x = (jax.random.normal(keys[0], shape) * 3 + 1).astype(dtype)
    scale = (1 + 0.1 * jax.random.normal(keys[1], shape[-1:])).astype(dtype)
    bias = (0.1 * jax.random.normal(keys[2], shape[-1:])).astype(dtype)
    weights = jax.random.normal(keys[3], shape)
    return x, scale, bias, weights


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
def test_rms_norm_values_and_gradients_equal_autodiff(dtype, tol):
    x, scale, _, w = _inputs(dtype)
    ours = lambda x, s: jnp.sum(rms_norm(x, s, 1e-6, dtype).astype(jnp.float32) * w)  # noqa: E731
    ref = lambda x, s: jnp.sum(plain_rms(x, s, 1e-6, dtype).astype(jnp.float32) * w)  # noqa: E731
    np.testing.assert_array_equal(np.asarray(rms_norm(x, scale, 1e-6, dtype), np.float32),
                                  np.asarray(plain_rms(x, scale, 1e-6, dtype), np.float32))
    for a, b in zip(jax.grad(ours, (0, 1))(x, scale), jax.grad(ref, (0, 1))(x, scale)):
        assert a.dtype == b.dtype
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
def test_layer_norm_values_and_gradients_equal_autodiff(dtype, tol):
    x, scale, bias, w = _inputs(dtype)
    ours = lambda *a: jnp.sum(layer_norm(*a, 1e-5, dtype).astype(jnp.float32) * w)  # noqa: E731
    ref = lambda *a: jnp.sum(plain_layer(*a, 1e-5, dtype).astype(jnp.float32) * w)  # noqa: E731
    np.testing.assert_array_equal(np.asarray(layer_norm(x, scale, bias, 1e-5, dtype), np.float32),
                                  np.asarray(plain_layer(x, scale, bias, 1e-5, dtype), np.float32))
    for a, b in zip(jax.grad(ours, (0, 1, 2))(x, scale, bias), jax.grad(ref, (0, 1, 2))(x, scale, bias)):
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=tol, atol=tol)


def test_norm_backward_keeps_the_input_and_one_number_per_row():
    """Differentiated by JAX, the plain RMSNorm of a bf16 residual stream (an add, as in a block)
    keeps float32 copies of the whole input; ours keeps nothing of that size in float32."""
    x, scale, _, _ = _inputs(jnp.bfloat16, (1, 64, 256))
    w, w0 = jnp.ones((256, 8), jnp.bfloat16), jnp.eye(256, dtype=jnp.bfloat16)
    big = lambda res: [r for r in res if int(np.prod(r[0])) >= 64 * 256]  # noqa: E731
    plain = saved_activations(lambda x, s: jnp.sum(plain_rms(x + x @ w0, s, 1e-6, jnp.bfloat16) @ w), x, scale)
    ours = saved_activations(lambda x, s: jnp.sum(rms_norm(x + x @ w0, s, 1e-6, jnp.bfloat16) @ w), x, scale)
    assert any(r[1] == jnp.float32 for r in big(plain)), plain
    assert not any(r[1] == jnp.float32 for r in big(ours)), ours
    assert sum(int(np.prod(r[0])) for r in ours if r[1] == jnp.float32) <= 64, ours

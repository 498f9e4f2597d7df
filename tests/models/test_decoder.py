"""Masks (padding, packing), attention implementations, dtypes and the linear-op dispatch."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxtune.models import Model, ModelConfig, positions_from_segments
from jaxtune.ops import linear, register_linear

CFG = ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                  intermediate_size=48, initializer_range=0.2)


@pytest.fixture(scope="module")
def model_and_params():
    model = Model(CFG)
    return model, model.init(jax.random.key(0))


def test_positions_restart_per_segment():
    seg = jnp.array([[1, 1, 1, 2, 2, 3, 0, 0], [0, 0, 1, 1, 1, 1, 1, 1]])
    np.testing.assert_array_equal(positions_from_segments(seg),
                                  [[0, 1, 2, 0, 1, 0, 0, 1], [0, 1, 0, 1, 2, 3, 4, 5]])


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_packed_documents_do_not_attend_across_segments(family):
    cfg = CFG if family == "llama" else CFG.replace(family="gpt2", norm="layernorm", mlp="plain",
                                                    activation="gelu_tanh", position="learned", num_kv_heads=4)
    model = Model(cfg)
    params = model.init(jax.random.key(1))
    apply = jax.jit(model.apply)
    docs = [np.array([3, 9, 4, 7, 1]), np.array([8, 2, 6]), np.array([5, 5, 11, 30])]
    packed = np.concatenate(docs)[None]
    segments = np.concatenate([np.full(len(d), i + 1) for i, d in enumerate(docs)])[None]
    packed_logits = np.asarray(apply(params, jnp.asarray(packed), segment_ids=jnp.asarray(segments)))
    start = 0
    for d in docs:
        alone = np.asarray(apply(params, jnp.asarray(d[None])))
        np.testing.assert_allclose(packed_logits[0, start:start + len(d)], alone[0], atol=1e-5)
        start += len(d)


def test_padding_does_not_change_real_tokens(model_and_params):
    model, params = model_and_params
    seq = np.array([[7, 3, 22, 9, 40]])
    alone = np.asarray(model.apply(params, jnp.asarray(seq)))
    left = np.concatenate([np.full((1, 3), 13), seq], 1)  # junk (not zero) in the padding
    left_mask = np.array([[0, 0, 0, 1, 1, 1, 1, 1]])
    right = np.concatenate([seq, np.full((1, 3), 13)], 1)
    right_mask = np.array([[1, 1, 1, 1, 1, 0, 0, 0]])
    out_left = np.asarray(model.apply(params, jnp.asarray(left), segment_ids=jnp.asarray(left_mask)))
    out_right = np.asarray(model.apply(params, jnp.asarray(right), segment_ids=jnp.asarray(right_mask)))
    np.testing.assert_allclose(out_left[0, 3:], alone[0], atol=1e-5)
    np.testing.assert_allclose(out_right[0, :5], alone[0], atol=1e-5)
    assert np.isfinite(out_left).all() and np.isfinite(out_right).all()


@pytest.mark.parametrize("impl", ["dpa", "xla", "blockwise", "cudnn"])
def test_attention_implementations_agree(model_and_params, impl):
    """Every implementation gives the default's logits at real tokens (a padding query's output is
    not defined alike: dense paths average every key, blockwise gives zero; nothing reads it).
    cudnn on a machine without cuDNN falls back (with a warning) to blockwise."""
    model, params = model_and_params
    tokens = jax.random.randint(jax.random.key(2), (3, 10), 0, 64)
    seg = jnp.array([[1] * 10, [0, 0, 0] + [1] * 7, [1] * 4 + [2] * 6])
    real = np.asarray(seg) != 0
    a = np.asarray(model.apply(params, tokens, segment_ids=seg))
    b = np.asarray(Model(CFG.replace(attention_impl=impl)).apply(params, tokens, segment_ids=seg))
    np.testing.assert_allclose(b[real], a[real], atol=1e-5)
    assert np.isfinite(b).all()


def test_cache_prefill_then_decode_equals_full_forward(model_and_params):
    model, params = model_and_params
    tokens = jax.random.randint(jax.random.key(3), (2, 9), 0, 64)
    full = model.apply(params, tokens)
    cache = model.init_cache(2, 12)
    positions = jnp.broadcast_to(jnp.arange(9), (2, 9))
    apply = jax.jit(model.apply)  # one compilation serves the three decode steps
    first, cache = apply(params, tokens[:, :6], positions=positions[:, :6], cache=cache)
    outs = [first]
    for t in range(6, 9):
        step, cache = apply(params, tokens[:, t:t + 1], positions=positions[:, t:t + 1], cache=cache)
        outs.append(step)
    np.testing.assert_allclose(np.concatenate(outs, 1), np.asarray(full), atol=1e-5)
    assert int(cache.end) == 9


def test_bf16_compute_keeps_float32_logits_and_stays_close(model_and_params):
    model, params = model_and_params
    tokens = jax.random.randint(jax.random.key(4), (2, 8), 0, 64)
    ref = jax.jit(model.apply)(params, tokens)
    bf16_params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    out = jax.jit(Model(CFG.replace(param_dtype="bfloat16", dtype="bfloat16")).apply)(bf16_params, tokens)
    assert out.dtype == jnp.float32
    rel = np.abs(np.asarray(out) - np.asarray(ref)).max() / np.abs(np.asarray(ref)).max()
    assert rel < 0.05
    assert jax.tree.leaves(Model(CFG.replace(param_dtype="bfloat16")).init(jax.random.key(0)))[0].dtype == jnp.bfloat16


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class HalvedWeight:
    """A toy typed leaf: the effective weight is 2 * half (stands in for LoRA / quantized leaves)."""

    half: jax.Array


@register_linear(HalvedWeight)
def _halved_linear(x, w, *, dtype, rng=None):
    return linear(x, w.half, dtype=dtype) * 2


def test_linear_dispatches_on_typed_leaves(model_and_params):
    model, params = model_and_params
    tokens = jax.random.randint(jax.random.key(5), (2, 7), 0, 64)
    typed = jax.tree_util.tree_map_with_path(
        lambda path, x: HalvedWeight(x / 2) if path[-1].key == "kernel" else x, params)
    n_typed = sum(isinstance(leaf, HalvedWeight)
                  for leaf in jax.tree.leaves(typed, is_leaf=lambda v: isinstance(v, HalvedWeight)))
    assert n_typed == 2 * 7 + 1  # every projection plus the LM head
    np.testing.assert_allclose(np.asarray(jax.jit(model.apply)(typed, tokens)),
                               np.asarray(jax.jit(model.apply)(params, tokens)), atol=1e-5)
    # gradients flow into the typed leaf's fields
    grads = jax.jit(jax.grad(lambda p: model.apply(p, tokens).sum()))(typed)
    assert isinstance(grads["layers_0"]["attn"]["q_proj"]["kernel"], HalvedWeight)


def test_unregistered_leaf_type_is_named():
    class Mystery:
        pass

    with pytest.raises(TypeError, match="Mystery"):
        linear(jnp.ones((2, 3)), Mystery())


def test_bad_inputs_are_named(model_and_params):
    model, params = model_and_params
    with pytest.raises(ValueError, match="segment_ids shape"):
        model.apply(params, jnp.ones((2, 4), jnp.int32), segment_ids=jnp.ones((2, 5), jnp.int32))
    with pytest.raises(ValueError, match="num_kv_heads"):
        ModelConfig(num_heads=4, num_kv_heads=3)
    with pytest.raises(ValueError, match="unsupported family"):
        ModelConfig(family="t5")


def test_cache_overflow_is_refused(model_and_params):
    model, params = model_and_params
    cache = model.init_cache(1, 4)
    tokens = jnp.ones((1, 4), jnp.int32)
    _, cache = model.apply(params, tokens, positions=jnp.arange(4)[None], cache=cache)
    with pytest.raises(ValueError, match="cache holds 4 of 4 slots"):
        model.apply(params, tokens[:, :1], positions=jnp.array([[4]]), cache=cache)

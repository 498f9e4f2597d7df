"""The train step: accumulation equals the big batch, the non-finite guard, losses, remat, precision."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxtune.data.streams import SyntheticStream
from jaxtune.models import Model, ModelConfig
from jaxtune.train.losses import causal_lm_loss, token_cross_entropy
from jaxtune.train.step import TrainState, accumulate_gradients, make_train_step
from jaxtune.utils.partition import join, mask_by_regex, split

CFG = ModelConfig(
    family="llama", vocab_size=97, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
    intermediate_size=64, max_position_embeddings=64,
)


def _setup(cfg=CFG, seed=0):
    model = Model(cfg)
    params = model.init(jax.random.key(seed))
    return model, params


def _batch(rows=8, seq=16, pad_fraction=0.6, seed=3, vocab=CFG.vocab_size):
    return {k: jnp.asarray(v) for k, v in SyntheticStream(rows, seq, vocab, seed=seed, pad_fraction=pad_fraction).batch_at(0).items()}


def test_accumulated_step_equals_big_batch_with_uneven_tokens():
    model, params = _setup()
    batch = _batch()
    # micro-batches (rows i % 4) really hold different numbers of real tokens
    per_micro = [float(batch["loss_mask"][i::4].sum()) for i in range(4)]
    assert len(set(per_micro)) > 1
    # SGD: unlike Adam's first step, its update is not invariant to a wrongly scaled gradient.
    opt = optax.sgd(0.5)
    loss_fn = causal_lm_loss(model)
    results = {}
    for accum in (1, 2, 4):
        state = TrainState.create(params, opt, jax.random.key(0))
        step = make_train_step(loss_fn, opt, grad_accum=accum)
        state, metrics = step(state, None, batch)
        results[accum] = (state.params, metrics)
    for accum in (2, 4):
        np.testing.assert_allclose(results[accum][1]["loss"], results[1][1]["loss"], rtol=1e-6)
        np.testing.assert_allclose(results[accum][1]["grad_norm"], results[1][1]["grad_norm"], rtol=1e-5)
        assert results[accum][1]["tokens"] == results[1][1]["tokens"]
        diff = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), results[accum][0], results[1][0])
        assert max(jax.tree.leaves(diff)) < 1e-6

    # The naive alternative (mean of per-micro-batch means) gives a clearly different gradient,
    # so the test above would catch a loop that normalised per micro-batch.
    def mean_loss(p, mb):
        total, weight, _ = loss_fn(p, mb, None)
        return total / weight

    grad = jax.jit(jax.grad(mean_loss))
    correct = grad(params, batch)
    naive = jax.tree.map(lambda *g: sum(g) / 4, *[grad(params, jax.tree.map(lambda x: x[i::4], batch)) for i in range(4)])
    gap = optax.global_norm(jax.tree.map(jnp.subtract, naive, correct)) * 0.5  # times the SGD lr
    assert gap > 1e-3


def test_loss_matches_closed_form_cross_entropy_and_z_loss():
    model, params = _setup()
    batch = _batch(pad_fraction=0.4)
    logits = np.asarray(model.apply(params, batch["tokens"], segment_ids=batch["segment_ids"]), np.float64)
    lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    target = np.take_along_axis(logits, np.asarray(batch["targets"])[..., None], -1)[..., 0]
    mask = np.asarray(batch["loss_mask"], np.float64)
    nll = ((lse - target) * mask).sum()
    z = (lse**2 * mask).sum()
    total, weight, metrics = causal_lm_loss(model, z_loss=1e-3)(params, batch, None)
    assert float(weight) == mask.sum()
    np.testing.assert_allclose(float(metrics["nll"]), nll, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["z_loss"]), z, rtol=1e-5)
    np.testing.assert_allclose(float(total), nll + 1e-3 * z, rtol=1e-5)


def test_chunked_cross_entropy_equals_full():
    model, params = _setup()
    batch = _batch()
    hidden, _ = model.hidden(params, batch["tokens"], segment_ids=batch["segment_ids"])

    def f(p, chunk):
        return token_cross_entropy(p, hidden, batch["targets"], batch["loss_mask"], model, chunk_tokens=chunk)[0]

    full, g_full = jax.value_and_grad(f)(params, 0)
    chunked, g_chunk = jax.value_and_grad(f)(params, 24)  # 128 tokens: 6 chunks, the last one padded
    np.testing.assert_allclose(chunked, full, rtol=1e-6)
    np.testing.assert_allclose(g_chunk["lm_head"]["kernel"], g_full["lm_head"]["kernel"], rtol=1e-5, atol=1e-6)


def test_non_finite_step_is_skipped_and_counted():
    model, params = _setup()
    base = causal_lm_loss(model)

    def loss_fn(p, batch, rng):
        total, weight, metrics = base(p, batch, rng)
        return jnp.where(batch["poison"][0, 0] > 0, jnp.nan, total), weight, metrics

    opt = optax.adamw(1e-2)
    step = make_train_step(loss_fn, opt)
    good = {**_batch(), "poison": jnp.zeros((8, 16), jnp.int32)}
    bad = {**good, "poison": jnp.ones((8, 16), jnp.int32)}
    state = TrainState.create(params, opt, jax.random.key(0))
    state, m = step(state, None, good)
    assert bool(m["finite"]) and int(state.streak) == 0
    before = jax.device_get(state)
    state, m = step(state, None, bad)
    state, m = step(state, None, bad)
    assert not bool(m["finite"])
    assert (int(state.skipped), int(state.streak), int(state.step)) == (2, 2, 3)
    for a, b in zip(jax.tree.leaves(before.params) + jax.tree.leaves(before.opt_state),
                    jax.tree.leaves(state.params) + jax.tree.leaves(state.opt_state)):
        np.testing.assert_array_equal(a, b)
    state, m = step(state, None, good)
    assert bool(m["finite"]) and int(state.streak) == 0 and int(state.skipped) == 2


@pytest.mark.parametrize("policy", ["full", "save_dots", "save_layer_inputs"])
def test_remat_policies_keep_gradients_and_save_less(policy):
    model, params = _setup()
    batch = _batch()
    remat_model = Model(CFG.replace(remat=policy))

    def loss(m):
        return lambda p: causal_lm_loss(m)(p, batch, None)[0]

    g0 = jax.jit(jax.grad(loss(model)))(params)
    g1 = jax.jit(jax.grad(loss(remat_model)))(params)
    diff = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), g0, g1)
    assert max(jax.tree.leaves(diff)) < 1e-5

    def saved_bytes(m):
        # The VJP closure is a pytree holding exactly the residuals kept for the backward pass
        # (its shapes, traced: nothing runs).
        vjp_fn = jax.eval_shape(lambda p: jax.vjp(loss(m), p)[1], params)
        return sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(vjp_fn))

    none, remat = saved_bytes(model), saved_bytes(remat_model)
    assert remat < none, (policy, remat, none)
    if policy == "save_dots":
        assert remat > saved_bytes(Model(CFG.replace(remat="full")))


def test_bf16_compute_keeps_fp32_master_weights():
    model, params = _setup()
    bf16 = Model(CFG.replace(dtype="bfloat16"))
    batch = _batch()
    opt = optax.adamw(1e-2)
    state = TrainState.create(params, opt, jax.random.key(0))
    state, m16 = make_train_step(causal_lm_loss(bf16), opt)(state, None, batch)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.params))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.opt_state) if jnp.issubdtype(x.dtype, jnp.floating))
    state32 = TrainState.create(params, opt, jax.random.key(0))
    _, m32 = make_train_step(causal_lm_loss(model), opt)(state32, None, batch)
    np.testing.assert_allclose(m16["loss"], m32["loss"], rtol=2e-2)
    assert float(m16["loss"]) != float(m32["loss"])  # the bf16 run really computed in bf16
    jaxpr = str(jax.make_jaxpr(lambda p: causal_lm_loss(bf16)(p, batch, None)[0])(params))
    assert "bf16[8,16,64] = dot_general" in jaxpr.replace("\n", " ") or "bf16[8,16,64]" in jaxpr


def test_bf16_params_train_in_bf16():
    """param_dtype=bfloat16: grads, moments and updated weights stay bf16 (a float32 grad would give the
    optimizer float32 moments, which the non-finite guard's two branches cannot both return)."""
    cfg = CFG.replace(param_dtype="bfloat16", dtype="bfloat16")
    model, params = _setup(cfg)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(params))
    opt = optax.adamw(1e-2)
    step = make_train_step(causal_lm_loss(model), opt)
    state = TrainState.create(params, opt, jax.random.key(0))
    for seed in range(2):
        state, m = step(state, None, _batch(seed=seed))
        assert bool(m["finite"])
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(state.params))
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(state.opt_state) if jnp.issubdtype(x.dtype, jnp.floating))
    moved = [float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))))
             for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(state.params))]
    assert max(moved) > 0


def test_frozen_half_gets_no_gradient_and_no_optimizer_state():
    model, params = _setup()
    mask = mask_by_regex(params, [r"mlp/"])
    trainable, frozen = split(params, mask)
    assert join(trainable, frozen).keys() == params.keys()
    opt = optax.adamw(1e-2)
    state = TrainState.create(trainable, opt, jax.random.key(0))
    n_trainable = sum(x.size for x in jax.tree.leaves(trainable))
    n_mu = sum(x.size for x in jax.tree.leaves(state.opt_state[0].mu))
    assert n_mu == n_trainable < sum(x.size for x in jax.tree.leaves(params))
    state, _ = make_train_step(causal_lm_loss(model), opt)(state, frozen, _batch())
    new = join(state.params, frozen)
    assert np.array_equal(new["layers_0"]["attn"]["q_proj"]["kernel"], params["layers_0"]["attn"]["q_proj"]["kernel"])
    assert not np.array_equal(new["layers_0"]["mlp"]["up_proj"]["kernel"], params["layers_0"]["mlp"]["up_proj"]["kernel"])
    with pytest.raises(ValueError, match="match no parameter"):
        mask_by_regex(params, [r"nothing_like_this"])


def test_accumulate_rejects_uneven_split():
    model, params = _setup()
    with pytest.raises(ValueError, match="does not split into 3 micro-batches"):
        accumulate_gradients(causal_lm_loss(model), params, None, _batch(), jax.random.key(0), 3)

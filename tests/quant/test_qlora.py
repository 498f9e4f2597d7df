"""QLoRA: LoRA / DoRA over quantized bases -- identity at init, gradients only to the adapters,
bf16 compute, merge (dense or requantized, said out loud), PiSSA on a quantized base, a QLoRA
fine-tune through the loop that leaves the 4-bit base bit-identical."""

import dataclasses
import itertools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxtune.data.streams import SyntheticStream
from jaxtune.models import Model
from jaxtune.models.presets import preset
from jaxtune.parallel import MeshConfig, make_mesh
from jaxtune.peft import DoraWeight, LoraConfig, LoraWeight, apply_dora, apply_lora, merge_quantized, trainable_mask
from jaxtune.peft.core import count_trainable
from jaxtune.quant import QuantConfig, QuantizedWeight, quantize
from jaxtune.train.config import TrainConfig
from jaxtune.train.loop import train
from jaxtune.train.losses import causal_lm_loss
from jaxtune.train.optim import OptimConfig, build_optimizer
from jaxtune.utils.partition import join, split

CFG = preset("tiny-llama").replace(num_layers=2)
MODEL = Model(CFG)
PARAMS = MODEL.init(jax.random.key(0))
QPARAMS = quantize(PARAMS, QuantConfig())
TOKENS = jax.random.randint(jax.random.key(1), (2, 12), 0, CFG.vocab_size)
LORA = LoraConfig(rank=8, alpha=16, targets=("all-linear",))
logits = jax.jit(MODEL.apply)


def _leaves(params, cls):
    return [x for x in jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, cls)) if isinstance(x, cls)]


def _randomise(params, field, seed=2):
    keys = iter(jax.random.split(jax.random.key(seed), 64))
    cls = (LoraWeight, DoraWeight)
    return jax.tree.map(lambda x: dataclasses.replace(x, **{field: 0.05 * jax.random.normal(next(keys), getattr(x, field).shape)})
                        if isinstance(x, cls) else x, params, is_leaf=lambda x: isinstance(x, cls))


@pytest.mark.parametrize("apply", [apply_lora, apply_dora])
def test_identity_at_init_over_a_4bit_base(apply):
    adapted = apply(QPARAMS, LORA, jax.random.key(3))
    leaves = _leaves(adapted, (LoraWeight, DoraWeight))
    assert len(leaves) == 7 * CFG.num_layers and all(isinstance(x.base, QuantizedWeight) for x in leaves)
    np.testing.assert_allclose(logits(adapted, TOKENS), logits(QPARAMS, TOKENS), atol=2e-6, rtol=0)
    # bf16 compute over the same tree (QLoRA's compute dtype): still the quantized base's function
    bf16 = jax.jit(Model(CFG.replace(dtype="bfloat16")).apply)
    np.testing.assert_allclose(bf16(adapted, TOKENS), bf16(QPARAMS, TOKENS), atol=0.05, rtol=0)


@pytest.mark.parametrize("apply", [apply_lora, apply_dora])
def test_gradients_reach_only_the_adapters(apply):
    adapted = _randomise(apply(QPARAMS, LORA, jax.random.key(3)), "b")
    mask = trainable_mask(adapted)
    trainable, frozen = split(adapted, mask)
    batch = next(SyntheticStream(2, 12, CFG.vocab_size, seed=0))
    loss_fn = causal_lm_loss(Model(CFG.replace(dtype="bfloat16")))
    grads = jax.jit(jax.grad(lambda t, f: loss_fn(join(t, f), batch, None)[0]))(trainable, frozen)
    names = {type(x).__name__ for x in _leaves(grads, (LoraWeight, DoraWeight))}
    assert names == {"LoraWeight"} if apply is apply_lora else {"DoraWeight"}
    for leaf in _leaves(grads, (LoraWeight, DoraWeight)):
        assert jax.tree.leaves(leaf.base) == []  # the quantized base's arrays are in the frozen half only
        for g in jax.tree.leaves(leaf):
            assert g.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(g))) and float(jnp.abs(g).max()) > 0
    n_train, n_total = count_trainable(adapted, mask)
    assert n_total == sum(int(np.prod(x.shape)) for x in jax.tree.leaves(PARAMS)) + n_train  # logical sizes
    assert all(not any(jax.tree.leaves(m)) for m in _leaves(mask, QuantizedWeight))


def test_merge_dense_equals_the_adapter_model_and_requantize_says_what_it_costs():
    adapted = _randomise(apply_lora(QPARAMS, LORA, jax.random.key(3)), "b")
    with pytest.warns(UserWarning, match="dequantized and merged into dense kernels"):
        dense = merge_quantized(adapted)
    assert not _leaves(dense, QuantizedWeight) and not _leaves(dense, LoraWeight)
    np.testing.assert_allclose(logits(dense, TOKENS), logits(adapted, TOKENS), atol=2e-5, rtol=1e-5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        again = merge_quantized(adapted, requantize=True)
    assert any("requantizing loses precision" in str(w.message) for w in caught)
    assert len(_leaves(again, QuantizedWeight)) == 7 * CFG.num_layers and not _leaves(again, LoraWeight)
    drift = float(jnp.abs(logits(again, TOKENS) - logits(adapted, TOKENS)).max())
    assert 0 < drift < 0.5  # the merged update rounded to the 4-bit grid


def test_pissa_on_a_quantized_base_requantizes_the_residual():
    adapted = apply_lora(QPARAMS, dataclasses.replace(LORA, init="pissa"), jax.random.key(3))
    leaf = adapted["layers_0"]["attn"]["q_proj"]["kernel"]
    assert isinstance(leaf.base, QuantizedWeight)
    dq = QPARAMS["layers_0"]["attn"]["q_proj"]["kernel"].dequantize(jnp.float32)
    rebuilt = leaf.base.dequantize(jnp.float32) + leaf.scale * leaf.a @ leaf.b
    # PiSSA reproduces the (dequantized) base up to the rounding of the new residual
    assert float(jnp.abs(rebuilt - dq).max()) < 0.5 * float(jnp.abs(dq).max())
    assert float(jnp.linalg.norm(rebuilt - dq) / jnp.linalg.norm(dq)) < 0.12
    # LoRA first, then quantize: the residual base is quantized once (QLoRA with a PiSSA init)
    lora_then_q = quantize(apply_lora(PARAMS, dataclasses.replace(LORA, init="pissa"), jax.random.key(3)), QuantConfig())
    assert isinstance(lora_then_q["layers_0"]["attn"]["q_proj"]["kernel"].base, QuantizedWeight)


def test_qlora_fine_tune_through_the_loop_leaves_the_4bit_base_bit_identical():
    adapted = apply_lora(QPARAMS, LORA, jax.random.key(3))
    mask = trainable_mask(adapted)
    optimizer, schedule = build_optimizer(OptimConfig(lr=1e-2, warmup_steps=1, schedule="constant"), 20)
    cfg = CFG.replace(dtype="bfloat16")
    stream = itertools.repeat(SyntheticStream(8, 32, CFG.vocab_size, seed=4).batch_at(0))  # fit a fixed batch
    result = train(loss_fn=causal_lm_loss(Model(cfg)), params=adapted, model_cfg=cfg,
                   optimizer=optimizer, schedule=schedule, cfg=TrainConfig(steps=20, batch_size=8, seq_len=32, eval_batches=0),
                   batches=stream, mesh=make_mesh(MeshConfig()), trainable_mask=mask)
    losses = [h["loss"] for h in result.history]
    assert losses[-1] < losses[0] - 1.0, losses
    for before, after in zip(_leaves(adapted, QuantizedWeight), _leaves(result.params, QuantizedWeight)):
        for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    moments = [x for x in jax.tree.leaves(result.state.opt_state) if getattr(x, "ndim", 0) >= 1]
    n_adapter = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(result.state.params))
    assert sum(int(np.prod(x.shape)) for x in moments) == 2 * n_adapter  # Adam moments for A and B only
    assert result.total_params == sum(int(np.prod(x.shape)) for x in jax.tree.leaves(PARAMS)) + n_adapter

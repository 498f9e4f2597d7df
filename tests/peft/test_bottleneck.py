"""Bottleneck adapters (Houlsby, Pfeiffer) as adapter leaves: placement, identity at init, the
adapter sees the biased sublayer output (checked through the model's own `Linear` against a numpy
reference), removal and the adapter-free view are exact, dropout only in training, derived
sharding, and a fit through the one loop in which only the adapter arrays move."""

import itertools
import math

import jax
import jax.numpy as jnp
from jax.sharding import AbstractMesh, PartitionSpec as P
import numpy as np
import pytest

from jaxtune.data.streams import SyntheticStream
from jaxtune.models import Model
from jaxtune.models.layers import Linear
from jaxtune.models.presets import preset
from jaxtune.ops import linear
from jaxtune.parallel import MeshConfig, make_mesh, param_specs
from jaxtune.peft import LoraConfig, LoraWeight, apply_lora
from jaxtune.peft.bottleneck import (
    BottleneckConfig,
    BottleneckWeight,
    KernelWithBias,
    apply_bottleneck,
    remove_bottleneck,
)
from jaxtune.peft.core import base_model, trainable_mask
from jaxtune.train.config import TrainConfig
from jaxtune.train.loop import train
from jaxtune.train.losses import causal_lm_loss
from jaxtune.train.optim import OptimConfig, build_optimizer
from jaxtune.utils.partition import count, split
from jaxtune.utils.tree import keypath_str

SMALL = dict(vocab_size=64, hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=2, head_dim=16,
             intermediate_size=64, initializer_range=0.2)
LLAMA = preset("tiny-llama").replace(**SMALL)
GPT = preset("tiny-gpt2").replace(**SMALL)  # biases on every projection, LayerNorm
CFGS = {"llama": LLAMA, "gpt": GPT}
PARAMS = {name: jax.jit(Model(cfg).init)(jax.random.key(0)) for name, cfg in CFGS.items()}
TOKENS = jnp.asarray(np.random.default_rng(1).integers(0, 64, (2, 12)), jnp.int32)
LOGITS = {name: jax.jit(lambda p, cfg=cfg: Model(cfg).apply(p, TOKENS)) for name, cfg in CFGS.items()}


def _is_bn(x):
    return isinstance(x, BottleneckWeight)


def _adapted_paths(params):
    flat = jax.tree_util.tree_flatten_with_path(params, is_leaf=_is_bn)[0]
    return sorted(keypath_str(p) for p, x in flat if _is_bn(x))


def _randomise(params, seed=7, std=0.3):
    """Random up / biases (at init up = 0 and the adapter is silent). numpy: eager jax.random
    would cost a compilation per shape."""
    rng = np.random.default_rng(seed)

    def one(x):
        if not _is_bn(x):
            return x
        rnd = lambda a: jnp.asarray(std * rng.standard_normal(a.shape), a.dtype)  # noqa: E731
        return BottleneckWeight(x.base, x.down, rnd(x.down_bias), rnd(x.up), rnd(x.up_bias), x.activation,
                                x.dropout, x.scale)

    return jax.tree.map(one, params, is_leaf=_is_bn)


@pytest.mark.parametrize("model,placement", [("gpt", "houlsby"), ("llama", "pfeiffer")])
def test_placement_and_identity_at_init(model, placement):
    adapted = apply_bottleneck(PARAMS[model], BottleneckConfig(placement=placement, size=8), jax.random.key(3))
    sites = ["attn/o_proj/kernel", "mlp/down_proj/kernel"] if placement == "houlsby" else ["mlp/down_proj/kernel"]
    assert _adapted_paths(adapted) == sorted(f"layers_{i}/{s}" for i in range(2) for s in sites)
    np.testing.assert_allclose(LOGITS[model](adapted), LOGITS[model](PARAMS[model]), atol=1e-6, rtol=0)
    leaf = adapted["layers_0"]["mlp"]["down_proj"]["kernel"]
    assert leaf.down.shape == (32, 8) and leaf.up.shape == (8, 32) and not np.asarray(leaf.up).any()
    assert 0.5 < float(np.std(np.asarray(leaf.down))) * math.sqrt(32) < 1.5  # down ~ N(0, 1/embed)
    if model == "gpt":  # the layer bias moved into the frozen base; the layer's own leaf holds zeros
        assert isinstance(leaf.base, KernelWithBias)
        np.testing.assert_array_equal(leaf.base.bias, PARAMS["gpt"]["layers_0"]["mlp"]["down_proj"]["bias"])
        assert not np.asarray(adapted["layers_0"]["mlp"]["down_proj"]["bias"]).any()


def test_adapter_sees_the_biased_sublayer_output():
    """Through the model's own `Linear` (which adds its bias after the linear op returns): the
    output is h + up(relu(h @ down + db)) + ub with h = x @ W + b, as in Houlsby's paper."""
    rng = np.random.default_rng(0)
    w, b = rng.standard_normal((16, 32)).astype(np.float32), rng.standard_normal(32).astype(np.float32)
    x = rng.standard_normal((3, 16)).astype(np.float32)
    tree = {"attn": {"o_proj": {"kernel": jnp.asarray(w), "bias": jnp.asarray(b)}}}
    adapted = _randomise(apply_bottleneck(tree, BottleneckConfig(size=4), jax.random.key(3)))
    leaf = adapted["attn"]["o_proj"]["kernel"]
    d, db, u, ub = (np.asarray(a) for a in (leaf.down, leaf.down_bias, leaf.up, leaf.up_bias))
    layer = Linear(32, use_bias=True, cfg=GPT)
    y = np.asarray(jax.jit(layer.apply)({"params": adapted["attn"]["o_proj"]}, jnp.asarray(x)))

    h = x @ w + b
    np.testing.assert_allclose(y, h + np.maximum(h @ d + db, 0) @ u + ub, atol=1e-4, rtol=1e-5)
    unbiased = x @ w  # what an adapter wrapping only the kernel would see
    assert np.abs(y - (unbiased + np.maximum(unbiased @ d + db, 0) @ u + ub + b)).max() > 1e-2


def test_remove_and_the_adapter_free_view_are_exact():
    adapted = _randomise(apply_bottleneck(PARAMS["gpt"], BottleneckConfig(size=8), jax.random.key(3)))
    assert np.abs(np.asarray(LOGITS["gpt"](adapted)) - np.asarray(LOGITS["gpt"](PARAMS["gpt"]))).max() > 1e-2
    # (xW + b) + 0 in another fusion than xW + b: equal up to fp32 rounding
    np.testing.assert_allclose(LOGITS["gpt"](base_model(adapted)), LOGITS["gpt"](PARAMS["gpt"]), atol=1e-5, rtol=0)
    removed = remove_bottleneck(adapted)
    assert jax.tree.structure(removed) == jax.tree.structure(PARAMS["gpt"])
    for a, b in zip(jax.tree.leaves(removed), jax.tree.leaves(PARAMS["gpt"])):
        np.testing.assert_array_equal(a, b)
    # a bias trained meanwhile (BitFit on the zeroed leaf) is kept: the layer's bias becomes the sum
    adapted["layers_1"]["attn"]["o_proj"]["bias"] = jnp.full((32,), 0.5)
    restored = remove_bottleneck(adapted)["layers_1"]["attn"]["o_proj"]["bias"]
    np.testing.assert_allclose(restored, PARAMS["gpt"]["layers_1"]["attn"]["o_proj"]["bias"] + 0.5, atol=1e-7)


def test_dropout_only_on_the_adapter_branch_and_only_with_a_key():
    rng = np.random.default_rng(0)
    tree = {"mlp": {"down_proj": {"kernel": jnp.asarray(rng.standard_normal((16, 32)), jnp.float32)}}}
    cfg = BottleneckConfig(placement="pfeiffer", size=4, dropout=0.5)
    leaf = _randomise(apply_bottleneck(tree, cfg, jax.random.key(3)))["mlp"]["down_proj"]["kernel"]
    x = jnp.asarray(rng.standard_normal((64, 16)), jnp.float32)
    run = jax.jit(lambda x, leaf, key: (linear(x, leaf), linear(x, leaf, rng=key), x @ leaf.base))
    y, y_train, h = (np.asarray(a) for a in run(x, leaf, jax.random.key(9)))
    branch, dropped = y - h, y_train - h
    kept = np.isclose(dropped, 2 * branch, atol=1e-5)
    zeroed = np.isclose(dropped, 0.0, atol=1e-6)
    assert (kept | zeroed).all() and 0.35 < zeroed.mean() < 0.65


def test_sharding_follows_the_base_kernel():
    adapted = apply_bottleneck(PARAMS["gpt"], BottleneckConfig(size=8), jax.random.key(3))
    specs = param_specs(adapted, AbstractMesh((2, 2, 2), ("data", "fsdp", "tensor")), warn=False)
    o = specs["layers_0"]["attn"]["o_proj"]["kernel"]  # [heads*head_dim, embed]: P(tensor, fsdp)
    assert (o.base.kernel, o.base.bias) == (P("tensor", "fsdp"), P("fsdp"))
    assert (o.down, o.down_bias, o.up, o.up_bias) == (P("fsdp"), P(), P(None, "fsdp"), P("fsdp"))
    # a LoRA base keeps its own derived specs inside the adapter
    lora_first = apply_lora(PARAMS["llama"], LoraConfig(rank=2, targets=("mlp",)), jax.random.key(3))
    both = apply_bottleneck(lora_first, BottleneckConfig(placement="pfeiffer", size=8), jax.random.key(4))
    assert isinstance(both["layers_0"]["mlp"]["down_proj"]["kernel"].base, LoraWeight)
    specs = param_specs(both, AbstractMesh((2, 2, 2), ("data", "fsdp", "tensor")), warn=False)
    down = specs["layers_0"]["mlp"]["down_proj"]["kernel"]
    assert (down.base.base, down.base.a, down.base.b) == (P("tensor", "fsdp"), P("tensor"), P(None, "fsdp"))
    assert down.up == P(None, "fsdp")


def test_bad_configs_and_targets_fail_clearly():
    with pytest.raises(ValueError, match="placement"):
        BottleneckConfig(placement="parallel")
    with pytest.raises(ValueError, match="activation"):
        BottleneckConfig(activation="swish2")
    with pytest.raises(ValueError, match="size"):
        BottleneckConfig(size=0)
    with pytest.raises(ValueError, match="match no parameter"):
        apply_bottleneck({"w": jnp.ones((2, 2))}, BottleneckConfig(), jax.random.key(0))
    adapted = apply_bottleneck(PARAMS["llama"], BottleneckConfig(size=4), jax.random.key(0))
    with pytest.raises(ValueError, match="already has a bottleneck"):
        apply_bottleneck(adapted, BottleneckConfig(size=4), jax.random.key(0))


def test_fit_through_the_loop_trains_only_the_adapters():
    """Houlsby on the GPT-2-like model (biases moved into the frozen bases): the optimizer holds
    the adapters only, every adapter array moves, everything else comes out bit-identical, and the
    batch is fit far below the frozen model's loss (the first step's). Measured (60 steps, lr 1e-2,
    size 16): 4.93 -> 1.62 (Pfeiffer on the Llama, same settings: 4.82 -> 1.97)."""
    adapted = apply_bottleneck(PARAMS["gpt"], BottleneckConfig(placement="houlsby", size=16), jax.random.key(3))
    mask = trainable_mask(adapted)
    per_site = 32 * 16 + 16 + 16 * 32 + 32  # down, down_bias, up, up_bias
    assert count(split(adapted, mask)[0]) == 2 * 2 * per_site
    opt, schedule = build_optimizer(OptimConfig(lr=1e-2, warmup_steps=2, weight_decay=0.0, schedule="constant"),
                                    total_steps=60)
    batch = SyntheticStream(8, 32, GPT.vocab_size, seed=4).batch_at(0)
    result = train(loss_fn=causal_lm_loss(Model(GPT)), params=adapted, model_cfg=GPT, optimizer=opt,
                   schedule=schedule, cfg=TrainConfig(steps=60, batch_size=8, seq_len=32, log_every=20),
                   batches=itertools.repeat(batch), mesh=make_mesh(MeshConfig(data=1)), trainable_mask=mask)
    losses = [h["loss"] for h in result.history]
    print("houlsby", losses[0], losses[-1])
    assert losses[-1] < min(losses[0], math.log(64)) - 1.0, losses
    assert count(result.state.params) == 2 * 2 * per_site
    for m, before, after in zip(jax.tree.leaves(mask), jax.tree.leaves(adapted), jax.tree.leaves(result.params)):
        if m:
            assert np.abs(np.asarray(after) - np.asarray(before)).max() > 0  # down too (zero gradient at step 0)
        else:
            np.testing.assert_array_equal(before, after)  # kernels, moved and zeroed biases, norms

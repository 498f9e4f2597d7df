"""LoRA as a param-tree transform: identity at init, factored == merged, split/join, gradients
only on A and B, scaling and per-target patterns, derived sharding, PEFT's PiSSA / OLoRA / default
inits as the reference, and a fine-tune through the one loop that leaves the base untouched."""

import dataclasses
import itertools
import math

import jax
import jax.numpy as jnp
from jax.sharding import AbstractMesh, PartitionSpec as P
import numpy as np
import pytest

from jaxtune.data.streams import SyntheticStream
from jaxtune.models import Model
from jaxtune.models.presets import preset
from jaxtune.parallel import MeshConfig, make_mesh, param_specs
from jaxtune.peft import LoraConfig, LoraWeight, apply_lora, join_lora, lora_mask, merge, split_lora
from jaxtune.train.config import TrainConfig
from jaxtune.train.loop import train
from jaxtune.train.losses import causal_lm_loss
from jaxtune.train.optim import OptimConfig, build_optimizer
from jaxtune.utils.partition import count, split
from tests.reference import require

CFG = preset("tiny-llama")
MODEL = Model(CFG)
PARAMS = MODEL.init(jax.random.key(0))
TOKENS = jax.random.randint(jax.random.key(1), (2, 12), 0, CFG.vocab_size)
logits = jax.jit(MODEL.apply)


def _adapters(params):
    return [x for x in jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, LoraWeight)) if isinstance(x, LoraWeight)]


def _randomise_b(params, seed=2):
    keys = iter(jax.random.split(jax.random.key(seed), 64))
    return jax.tree.map(lambda x: dataclasses.replace(x, b=0.05 * jax.random.normal(next(keys), x.b.shape))
                        if isinstance(x, LoraWeight) else x, params, is_leaf=lambda x: isinstance(x, LoraWeight))


@pytest.mark.parametrize("init", ["default", "gaussian", "pissa", "olora"])
def test_model_unchanged_at_init(init):
    adapted = apply_lora(PARAMS, LoraConfig(rank=4, alpha=8, targets=("all-linear",), init=init), jax.random.key(3))
    assert len(_adapters(adapted)) == 7 * CFG.num_layers
    tol = 1e-6 if init in ("default", "gaussian") else 1e-4  # B = 0: equal up to fp32 rounding of the fused sum
    np.testing.assert_allclose(logits(adapted, TOKENS), logits(PARAMS, TOKENS), atol=tol, rtol=0)


def test_factored_equals_merged_and_split_join_round_trip():
    adapted = _randomise_b(apply_lora(PARAMS, LoraConfig(rank=4, alpha=8), jax.random.key(3)))
    factored = logits(adapted, TOKENS)
    assert float(jnp.max(jnp.abs(factored - logits(PARAMS, TOKENS)))) > 1e-3  # the adapters do something
    merged = merge(adapted)
    assert not _adapters(merged)
    np.testing.assert_allclose(logits(merged, TOKENS), factored, atol=2e-5, rtol=0)
    base, adapters = split_lora(adapted)
    assert sorted(adapters) == sorted(f"layers_{i}/attn/{p}_proj/kernel" for i in range(4) for p in "qkvo")
    for a, b in zip(jax.tree.leaves(base), jax.tree.leaves(PARAMS)):
        np.testing.assert_array_equal(a, b)
    again = join_lora(base, adapters)
    for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(adapted)):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="not in the model"):
        join_lora(base, {**adapters, "nope/kernel": adapters["layers_0/attn/q_proj/kernel"]})


def _dot_operand_shapes(jaxpr):
    """Operand shapes of every dot_general in a jaxpr, sub-jaxprs (jit, remat, scan) included."""
    shapes = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            shapes.append(tuple(tuple(v.aval.shape) for v in eqn.invars))
        for param in eqn.params.values():
            for sub in param if isinstance(param, (list, tuple)) else (param,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    shapes.extend(_dot_operand_shapes(inner))
    return shapes


def test_factored_path_never_materialises_the_merged_weight():
    """The forward multiplies x by A, then by B: no dot of A [128, 4] with B [4, 128]."""
    adapted = apply_lora(PARAMS, LoraConfig(rank=4, targets=(r"layers_0/attn/q_proj/kernel$",)), jax.random.key(3))
    shapes = _dot_operand_shapes(jax.make_jaxpr(MODEL.apply)(adapted, TOKENS).jaxpr)
    assert ((24, 128), (128, 4)) in shapes and ((24, 4), (4, 128)) in shapes  # 2 x 12 tokens as one GEMM each
    assert ((128, 4), (4, 128)) not in shapes
    merged = _dot_operand_shapes(jax.make_jaxpr(lambda p: merge(p))(adapted).jaxpr)
    assert ((128, 4), (4, 128)) in merged  # what the check would catch


def test_gradients_reach_only_a_and_b():
    # (B is randomised: at init B = 0, so A's gradient is exactly zero)
    adapted = _randomise_b(apply_lora(PARAMS, LoraConfig(rank=4, targets=("attention-qv",)), jax.random.key(3)))
    trainable, frozen = split(adapted, lora_mask(adapted))
    assert count(trainable) == CFG.num_layers * ((128 * 4 + 4 * 128) + (128 * 4 + 4 * 64))  # q: 128->128, v: 128->64
    from jaxtune.utils.partition import join

    def loss(t):
        return jnp.mean(MODEL.apply(join(t, frozen), TOKENS) ** 2)

    grads = jax.jit(jax.grad(loss))(trainable)
    leaves = [g for g in jax.tree.leaves(grads) if g is not None]
    assert len(leaves) == CFG.num_layers * 2 * 2 and all(float(jnp.abs(g).sum()) > 0 for g in leaves)
    print(f"trainable {count(trainable):,} of {count(adapted):,} ({count(trainable) / count(adapted):.2%})")


def test_scaling_rslora_and_per_target_patterns():
    cfg = LoraConfig(rank=8, alpha=16, targets=("attention",), rank_pattern={"q_proj": 2}, alpha_pattern={"v_proj": 4})
    adapted = apply_lora(PARAMS, cfg, jax.random.key(3))
    attn = adapted["layers_0"]["attn"]
    assert (attn["q_proj"]["kernel"].rank, attn["q_proj"]["kernel"].scale) == (2, 8.0)
    assert (attn["k_proj"]["kernel"].rank, attn["k_proj"]["kernel"].scale) == (8, 2.0)
    assert attn["v_proj"]["kernel"].scale == 0.5
    rs = apply_lora(PARAMS, LoraConfig(rank=16, alpha=16, rslora=True), jax.random.key(3))
    assert rs["layers_0"]["attn"]["o_proj"]["kernel"].scale == pytest.approx(16 / math.sqrt(16))
    with pytest.raises(ValueError, match="match no parameter"):
        apply_lora(PARAMS, LoraConfig(targets=("nothing_here",)), jax.random.key(3))
    with pytest.raises(ValueError, match="already has a LoRA adapter"):
        apply_lora(adapted, cfg, jax.random.key(3))
    with pytest.raises(ValueError, match="rank <= min"):
        apply_lora(PARAMS, LoraConfig(rank=200, init="pissa"), jax.random.key(3))


def test_adapter_sharding_follows_the_base_kernel():
    adapted = apply_lora(PARAMS, LoraConfig(rank=4, targets=("all-linear",)), jax.random.key(3))
    specs = param_specs(adapted, AbstractMesh((2, 2, 2), ("data", "fsdp", "tensor")), warn=False)
    q = specs["layers_0"]["attn"]["q_proj"]["kernel"]
    assert (q.base, q.a, q.b) == (P("fsdp", "tensor"), P("fsdp"), P(None, "tensor"))
    down = specs["layers_0"]["mlp"]["down_proj"]["kernel"]
    assert (down.base, down.a, down.b) == (P("tensor", "fsdp"), P("tensor"), P(None, "fsdp"))


@pytest.mark.parametrize("init", ["pissa", "olora", "default"])
def test_inits_match_peft(init):
    """PEFT on a torch Linear with the same weight: the residual base (PiSSA, OLoRA) and the
    product s*A@B agree with jaxtune's (sign choices of SVD/QR cancel in both); default: A's bound."""
    torch = require("torch")
    peft = require("peft")
    rank, alpha, d_in, d_out = 4, 8, 24, 16
    w = np.random.default_rng(0).standard_normal((d_in, d_out)).astype(np.float32)  # jaxtune layout [in, out]

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(d_in, d_out, bias=False)

    net = Net()
    with torch.no_grad():
        net.proj.weight.copy_(torch.from_numpy(w.T.copy()))
    init_arg = {"pissa": "pissa", "olora": "olora", "default": True}[init]
    model = peft.get_peft_model(net, peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=["proj"],
                                                     init_lora_weights=init_arg))
    layer = model.base_model.model.proj
    ref_base = layer.base_layer.weight.detach().numpy().T
    ref_a = layer.lora_A["default"].weight.detach().numpy().T  # [in, r]
    ref_b = layer.lora_B["default"].weight.detach().numpy().T  # [r, out]
    ref_scale = layer.scaling["default"]

    ours = apply_lora({"proj": {"kernel": jnp.asarray(w)}},
                      LoraConfig(rank=rank, alpha=alpha, targets=(r"proj/kernel$",), init=init), jax.random.key(0))
    leaf = ours["proj"]["kernel"]
    assert leaf.scale == pytest.approx(ref_scale)
    if init == "default":
        bound = 1 / math.sqrt(d_in)
        assert np.abs(np.asarray(leaf.a)).max() <= bound and np.abs(ref_a).max() <= bound
        assert np.abs(np.asarray(leaf.a)).max() > 0.8 * bound and not np.asarray(leaf.b).any() and not ref_b.any()
        return
    np.testing.assert_allclose(np.asarray(leaf.base), ref_base, atol=1e-5)
    np.testing.assert_allclose(leaf.scale * np.asarray(leaf.a) @ np.asarray(leaf.b), ref_scale * ref_a @ ref_b, atol=1e-5)


def test_lora_fine_tune_through_the_loop_trains_only_the_adapters():
    """The one loop with the LoRA mask fits a fixed batch (the frozen random base cannot: its loss
    is the first step's), and the base kernels come out bit-identical."""
    adapted = apply_lora(PARAMS, LoraConfig(rank=8, alpha=16, targets=("all-linear",)), jax.random.key(3))
    opt, schedule = build_optimizer(OptimConfig(lr=1e-2, warmup_steps=2, weight_decay=0.0, schedule="constant"),
                                    total_steps=25)
    batch = SyntheticStream(8, 32, CFG.vocab_size, seed=4).batch_at(0)
    result = train(loss_fn=causal_lm_loss(MODEL), params=adapted, model_cfg=CFG, optimizer=opt, schedule=schedule,
                   cfg=TrainConfig(steps=25, batch_size=8, seq_len=32, log_every=5), batches=itertools.repeat(batch),
                   mesh=make_mesh(MeshConfig(data=1)), trainable_mask=lora_mask(adapted))
    losses = [h["loss"] for h in result.history]
    assert losses[-1] < losses[0] - 1.0, losses  # 5.56 -> ~3.7 measured
    assert count(result.state.params) == count(split(adapted, lora_mask(adapted))[0])  # optimizer sees A, B only
    base_after, adapters = split_lora(result.params)
    for a, b in zip(jax.tree.leaves(base_after), jax.tree.leaves(PARAMS)):
        np.testing.assert_array_equal(a, b)  # the frozen base never moved
    assert all(float(jnp.abs(ad["b"]).sum()) > 0 for ad in adapters.values())


def test_lora_dropout_only_in_training_steps():
    """Dropout on the adapter input: absent without an rng (evaluation, generation), present and
    rng-dependent with one, unbiased (inverted dropout), and never on the base term."""
    adapted = _randomise_b(apply_lora(PARAMS, LoraConfig(rank=4, alpha=8, dropout=0.5), jax.random.key(3)))
    hidden = jax.jit(lambda p, t, r: MODEL.hidden(p, t, rng=r)[0])
    deterministic = jax.jit(lambda p, t: MODEL.hidden(p, t)[0])
    reference = deterministic(adapted, TOKENS)
    one, two = hidden(adapted, TOKENS, jax.random.key(5)), hidden(adapted, TOKENS, jax.random.key(6))
    assert float(jnp.max(jnp.abs(one - reference))) > 1e-3 and float(jnp.max(jnp.abs(one - two))) > 1e-3
    np.testing.assert_array_equal(hidden(adapted, TOKENS, jax.random.key(5)), one)  # same key, same mask
    # With B = 0 the adapter term vanishes, so dropout must leave the output untouched.
    fresh = apply_lora(PARAMS, LoraConfig(rank=4, alpha=8, dropout=0.5), jax.random.key(3))
    np.testing.assert_allclose(hidden(fresh, TOKENS, jax.random.key(5)), deterministic(PARAMS, TOKENS), atol=1e-5)
    # One layer: the mean over many dropout masks approaches the deterministic output.
    leaf = adapted["layers_0"]["attn"]["q_proj"]["kernel"]
    x = jax.random.normal(jax.random.key(7), (4, CFG.hidden_size))
    from jaxtune.ops import linear

    outs = jax.vmap(lambda k: linear(x, leaf, rng=k))(jax.random.split(jax.random.key(8), 4000))
    exact = linear(x, leaf)
    spread = float(jnp.std(outs - exact))
    assert spread > 1e-3
    np.testing.assert_allclose(jnp.mean(outs, 0), exact, atol=5 * spread / np.sqrt(4000))

"""DoRA as a param-tree transform: identity at init, factored == merged, gradients reach A, B and
the magnitude only and never flow through the (stop-gradient) weight norm, the factored norm's
accuracy against float64, and one layer against PEFT's DoRA on a torch nn.Linear (forward with
and without dropout, and the gradients)."""

import dataclasses

import jax
import jax.numpy as jnp
from jax.sharding import AbstractMesh, PartitionSpec as P
import numpy as np
import pytest

from jaxtune.models import Model
from jaxtune.models.presets import preset
from jaxtune.ops.linear import linear
from jaxtune.parallel import param_specs
from jaxtune.peft import LoraConfig, LoraWeight, apply_lora
from jaxtune.peft.core import base_model, trainable_mask
from jaxtune.peft.dora import DoraWeight, apply_dora, from_lora, merge_dora, weight_norm
from jaxtune.utils.partition import count, join, split
from tests.reference import require

# tiny-llama, shrunk further to keep this file fast (2 layers, hidden 64)
CFG = dataclasses.replace(preset("tiny-llama"), num_layers=2, hidden_size=64, head_dim=16, intermediate_size=96)
MODEL = Model(CFG)
PARAMS = MODEL.init(jax.random.key(0))
TOKENS = jax.random.randint(jax.random.key(1), (2, 12), 0, CFG.vocab_size)
logits = jax.jit(MODEL.apply)


def _is_dora(x):
    return isinstance(x, DoraWeight)


def _doras(params):
    return [x for x in jax.tree.leaves(params, is_leaf=_is_dora) if _is_dora(x)]


def _perturb(params, seed=2):
    """Random B and magnitudes: at init B = 0 and m = ||W||, which hides most mistakes."""
    keys = iter(jax.random.split(jax.random.key(seed), 256))

    def change(x):
        if not _is_dora(x):
            return x
        b = 0.05 * jax.random.normal(next(keys), x.b.shape)
        m = x.magnitude * jax.random.uniform(next(keys), x.magnitude.shape, minval=0.5, maxval=1.5)
        return DoraWeight(x.base, x.a, b, m, x.scale, x.dropout)

    return jax.tree.map(change, params, is_leaf=_is_dora)


def _random_leaf(seed=0, d_in=48, d_out=40, rank=4, scale=2.0, dropout=0.0, b_std=0.3):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((d_in, d_out)).astype(np.float32) / np.sqrt(d_in)
    a = rng.uniform(-1, 1, (d_in, rank)).astype(np.float32) / np.sqrt(d_in)
    b = (b_std * rng.standard_normal((rank, d_out))).astype(np.float32)
    m = (np.linalg.norm(w, axis=0) * rng.uniform(0.5, 1.5, d_out)).astype(np.float32)
    return DoraWeight(jnp.asarray(w), jnp.asarray(a), jnp.asarray(b), jnp.asarray(m), scale, dropout)


@pytest.mark.parametrize("init", ["default", "pissa"])
def test_model_unchanged_at_init(init):
    adapted = apply_dora(PARAMS, LoraConfig(rank=4, alpha=8, targets=("all-linear",), init=init), jax.random.key(3))
    leaves = _doras(adapted)
    assert len(leaves) == 7 * CFG.num_layers
    assert all(leaf.magnitude.shape == (leaf.base.shape[1],) for leaf in leaves)
    tol = 1e-5 if init == "default" else 1e-4  # m / ||W|| = 1 up to fp32 rounding; PiSSA: residual + top-r
    np.testing.assert_allclose(logits(adapted, TOKENS), logits(PARAMS, TOKENS), atol=tol, rtol=0)
    # A and B are apply_lora's for the same config and key
    lora = apply_lora(PARAMS, LoraConfig(rank=4, alpha=8, targets=("all-linear",), init=init), jax.random.key(3))
    q_d, q_l = adapted["layers_1"]["attn"]["q_proj"]["kernel"], lora["layers_1"]["attn"]["q_proj"]["kernel"]
    np.testing.assert_array_equal(q_d.a, q_l.a)
    assert q_d.scale == q_l.scale


def test_factored_equals_merged():
    adapted = _perturb(apply_dora(PARAMS, LoraConfig(rank=4, alpha=8, targets=("all-linear",)), jax.random.key(3)))
    factored = logits(adapted, TOKENS)
    assert float(jnp.max(jnp.abs(factored - logits(PARAMS, TOKENS)))) > 1e-2  # the adapters do something
    merged = merge_dora(adapted)
    assert not _doras(merged)
    np.testing.assert_allclose(logits(merged, TOKENS), factored, atol=2e-5, rtol=0)
    # the adapter-free view is the base model
    np.testing.assert_array_equal(logits(base_model(adapted), TOKENS), logits(PARAMS, TOKENS))


def test_lora_leaf_as_dora_is_the_same_layer():
    leaf = _random_leaf()
    lora = LoraWeight(leaf.base, leaf.a, leaf.b, leaf.scale)
    x = jax.random.normal(jax.random.key(0), (3, 48))
    np.testing.assert_allclose(linear(x, from_lora(lora)), linear(x, lora), atol=1e-5, rtol=0)


@pytest.mark.parametrize("b_std", [0.0, 0.05, 1.0, 10.0])
def test_factored_norm_is_accurate_in_float32(b_std):
    """||W + sAB|| per output feature without forming W + sAB: within 3e-7 of float64 (measured
    <= 2e-7, the same as forming the sum), from a zero update to one 10x the weight's norm."""
    leaf = _random_leaf(seed=1, d_in=512, d_out=256, rank=16, b_std=b_std)
    w, a, b = (np.asarray(t, np.float64) for t in (leaf.base, leaf.a, leaf.b))
    ref = np.linalg.norm(w + leaf.scale * a @ b, axis=0)
    factored = np.asarray(jax.jit(weight_norm, static_argnums=3)(leaf.base, leaf.a, leaf.b, leaf.scale))
    dense = np.asarray(weight_norm(leaf.base, leaf.a, leaf.b, leaf.scale, materialize=True))
    assert np.max(np.abs(factored - ref) / ref) < 3e-7
    assert np.max(np.abs(dense - ref) / ref) < 3e-7


def _dot_operand_shapes(jaxpr):
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


def test_forward_never_materialises_the_adapted_weight():
    leaf = _random_leaf()
    x = jnp.ones((2, 5, 48))
    shapes = _dot_operand_shapes(jax.make_jaxpr(lambda x, w: linear(x, w))(x, leaf).jaxpr)
    assert ((48, 4), (4, 40)) not in shapes  # no A @ B
    assert ((10, 48), (48, 4)) in shapes and ((10, 4), (4, 40)) in shapes  # 2 x 5 tokens as one GEMM each
    assert ((48, 4), (4, 40)) in _dot_operand_shapes(jax.make_jaxpr(lambda w: w.merged())(leaf).jaxpr)


def test_gradients_reach_a_b_and_magnitude_only():
    adapted = _perturb(apply_dora(PARAMS, LoraConfig(rank=4, targets=("attention-qv",)), jax.random.key(3)))
    mask = trainable_mask(adapted)
    trainable, frozen = split(adapted, mask)
    per_layer = (64 * 4 + 4 * 64 + 64) + (64 * 4 + 4 * 32 + 32)  # q: 64->64, v: 64->32
    assert count(trainable) == CFG.num_layers * per_layer

    def loss(t):
        return jnp.mean(MODEL.apply(join(t, frozen), TOKENS) ** 2)

    grads = jax.jit(jax.grad(loss))(trainable)
    leaves = [g for g in jax.tree.leaves(grads) if g is not None]
    assert len(leaves) == CFG.num_layers * 2 * 3 and all(float(jnp.abs(g).sum()) > 0 for g in leaves)
    q = grads["layers_0"]["attn"]["q_proj"]["kernel"]
    assert q.base is None and q.magnitude.shape == (64,)


def test_no_gradient_flows_through_the_norm():
    """jax.grad of the DoRA layer equals that of a reference with an explicit stop_gradient on
    the norm, and differs (by a lot) from the same reference without it."""
    leaf = _random_leaf(seed=3)
    x = jax.random.normal(jax.random.key(4), (6, 48))
    target = jax.random.normal(jax.random.key(5), (6, 40))

    def reference(a, b, m, stop):
        full = leaf.base + leaf.scale * a @ b
        norm = jnp.linalg.norm(full, axis=0)
        norm = jax.lax.stop_gradient(norm) if stop else norm
        return jnp.sum((x @ (full * (m / norm)[None, :]) - target) ** 2)

    def ours(a, b, m):
        return jnp.sum((linear(x, DoraWeight(leaf.base, a, b, m, leaf.scale)) - target) ** 2)

    args = (leaf.a, leaf.b, leaf.magnitude)
    g_ours = jax.grad(ours, argnums=(0, 1, 2))(*args)
    g_stop = jax.grad(lambda *t: reference(*t, True), argnums=(0, 1, 2))(*args)
    g_flow = jax.grad(lambda *t: reference(*t, False), argnums=(0, 1, 2))(*args)
    for mine, ref in zip(g_ours, g_stop):
        np.testing.assert_allclose(mine, ref, rtol=1e-4, atol=1e-5)
    rel = float(jnp.linalg.norm(g_flow[0] - g_stop[0]) / jnp.linalg.norm(g_stop[0]))
    assert rel > 0.05, rel  # the check above would see a norm that passes gradient


def _peft_layer(leaf: DoraWeight, bias: np.ndarray, dropout: float):
    torch = require("torch")
    peft = require("peft")
    d_in, d_out = leaf.base.shape

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(d_in, d_out, bias=True)

        def forward(self, x):
            return self.proj(x)

    model = peft.get_peft_model(Net(), peft.LoraConfig(r=leaf.rank, lora_alpha=leaf.scale * leaf.rank,
                                                       target_modules=["proj"], use_dora=True, lora_dropout=dropout))
    layer = model.base_model.model.proj
    assert layer.scaling["default"] == pytest.approx(leaf.scale)
    with torch.no_grad():
        layer.base_layer.weight.copy_(torch.from_numpy(np.asarray(leaf.base).T.copy()))
        layer.base_layer.bias.copy_(torch.from_numpy(bias))
        layer.lora_A["default"].weight.copy_(torch.from_numpy(np.asarray(leaf.a).T.copy()))
        layer.lora_B["default"].weight.copy_(torch.from_numpy(np.asarray(leaf.b).T.copy()))
        layer.lora_magnitude_vector["default"].weight.copy_(torch.from_numpy(np.asarray(leaf.magnitude)))
    return model, layer


def test_one_layer_matches_peft_dora():
    """Eval forward (bias outside the DoRA scaling) and the gradients of A, B and the magnitude
    against PEFT's DoraLinearLayer (which detaches the norm): fp32, <= 1e-5."""
    torch = require("torch")
    leaf = _random_leaf(seed=5)
    bias = np.random.default_rng(6).standard_normal(40).astype(np.float32)
    model, layer = _peft_layer(leaf, bias, dropout=0.0)
    x = np.random.default_rng(7).standard_normal((3, 5, 48)).astype(np.float32)
    model.train()  # lora_dropout 0: PEFT reuses the base result, as jaxtune does
    xt = torch.from_numpy(x)
    out = model(xt)
    (out ** 2).sum().backward()
    ours = lambda a, b, m: linear(jnp.asarray(x), DoraWeight(leaf.base, a, b, m, leaf.scale)) + bias  # noqa: E731
    np.testing.assert_allclose(ours(leaf.a, leaf.b, leaf.magnitude), out.detach().numpy(), atol=1e-5, rtol=0)
    grads = jax.grad(lambda *t: jnp.sum(ours(*t) ** 2), argnums=(0, 1, 2))(leaf.a, leaf.b, leaf.magnitude)
    ref = (layer.lora_A["default"].weight.grad.numpy().T, layer.lora_B["default"].weight.grad.numpy().T,
           layer.lora_magnitude_vector["default"].weight.grad.numpy())
    for mine, theirs in zip(grads, ref):
        scale = np.abs(theirs).max()
        np.testing.assert_allclose(np.asarray(mine) / scale, theirs / scale, atol=1e-5, rtol=0)


def test_dropout_matches_peft_dora():
    """With dropout active PEFT adds the DoRA term on the dropped input and recomputes the base
    product on it. The same keep-mask (jaxtune's, replayed in torch) gives the same output."""
    torch = require("torch")
    rate = 0.25
    leaf = _random_leaf(seed=8, dropout=rate)
    bias = np.random.default_rng(9).standard_normal(40).astype(np.float32)
    model, layer = _peft_layer(leaf, bias, dropout=rate)
    x = np.random.default_rng(10).standard_normal((4, 48)).astype(np.float32)
    key = jax.random.key(11)
    keep = np.asarray(jax.random.bernoulli(key, 1.0 - rate, x.shape))
    assert 0 < keep.mean() < 1

    class ReplayDropout(torch.nn.Module):
        def forward(self, t):
            return t * torch.from_numpy(keep.astype(np.float32)) / (1.0 - rate)

    layer.lora_dropout["default"] = ReplayDropout()
    model.train()
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    ours = np.asarray(linear(jnp.asarray(x), leaf, rng=key)) + bias
    np.testing.assert_allclose(ours, ref, atol=1e-5, rtol=0)
    no_dropout = np.asarray(linear(jnp.asarray(x), leaf)) + bias
    assert np.abs(no_dropout - ref).max() > 1e-2  # the mask matters


def test_magnitude_init_matches_peft():
    torch = require("torch")
    peft = require("peft")
    w = np.random.default_rng(12).standard_normal((24, 16)).astype(np.float32)  # [in, out]
    net = torch.nn.Sequential(torch.nn.Linear(24, 16, bias=False))
    with torch.no_grad():
        net[0].weight.copy_(torch.from_numpy(w.T.copy()))
    model = peft.get_peft_model(net, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["0"], use_dora=True))
    ref = model.base_model.model[0].lora_magnitude_vector["default"].weight.detach().numpy()
    ours = apply_dora({"proj": {"kernel": jnp.asarray(w)}}, LoraConfig(rank=4, alpha=8, targets=("proj/kernel$",)),
                      jax.random.key(0))["proj"]["kernel"]
    np.testing.assert_allclose(np.asarray(ours.magnitude), ref, rtol=1e-6)


def test_sharding_and_errors():
    adapted = apply_dora(PARAMS, LoraConfig(rank=4, targets=("all-linear",)), jax.random.key(3))
    specs = param_specs(adapted, AbstractMesh((2, 2, 2), ("data", "fsdp", "tensor")), warn=False)
    q = specs["layers_0"]["attn"]["q_proj"]["kernel"]
    assert (q.base, q.a, q.b, q.magnitude) == (P("fsdp", "tensor"), P("fsdp"), P(None, "tensor"), P("tensor"))
    down = specs["layers_0"]["mlp"]["down_proj"]["kernel"]
    assert (down.base, down.a, down.b, down.magnitude) == (P("tensor", "fsdp"), P("tensor"), P(None, "fsdp"), P("fsdp"))
    with pytest.raises(ValueError, match="already has an adapter"):
        apply_dora(adapted, LoraConfig(rank=4, targets=("attention",)), jax.random.key(3))
    with pytest.raises(ValueError, match="match no parameter"):
        apply_dora(PARAMS, LoraConfig(targets=("nothing_here",)), jax.random.key(3))
    # DoRA next to an earlier LoRA on other targets leaves the LoRA leaves alone
    mixed = apply_dora(apply_lora(PARAMS, LoraConfig(targets=("mlp",)), jax.random.key(1)),
                       LoraConfig(targets=("attention",)), jax.random.key(2))
    assert isinstance(mixed["layers_0"]["mlp"]["up_proj"]["kernel"], LoraWeight)
    assert isinstance(mixed["layers_0"]["attn"]["q_proj"]["kernel"], DoraWeight)

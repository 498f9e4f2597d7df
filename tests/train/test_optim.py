"""Optimizers and schedules against PyTorch / transformers, weight-decay masks by path."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxtune.models import Model
from jaxtune.models.presets import preset
from jaxtune.train.optim import OptimConfig, build_optimizer, build_schedule, decay_mask, is_decayed
from tests.reference import require


def test_decay_mask_excludes_norms_biases_embeddings_by_default():
    params = Model(preset("tiny-gpt2")).init(jax.random.key(0))
    mask = decay_mask(params, OptimConfig(weight_decay=0.1))
    assert mask["layers_0"]["attn"]["q_proj"]["kernel"] is True
    assert mask["layers_0"]["attn"]["q_proj"]["bias"] is False
    assert mask["layers_0"]["attn_norm"]["scale"] is False and mask["final_norm"]["bias"] is False
    assert mask["embed"]["embedding"] is False and mask["pos_embed"]["embedding"] is False
    everything = OptimConfig(decay_norms=True, decay_biases=True, decay_embeddings=True)
    assert all(jax.tree.leaves(decay_mask(params, everything)))
    assert not is_decayed("layers_3/mlp/up_proj/kernel", OptimConfig(no_decay=(r"layers_3/",)))


@pytest.mark.parametrize("kind,hf_name", [("cosine", "get_cosine_schedule_with_warmup"), ("linear", "get_linear_schedule_with_warmup")])
def test_schedules_match_transformers(kind, hf_name):
    torch = require("torch")
    transformers = require("transformers")
    cfg = OptimConfig(lr=1e-3, schedule=kind, warmup_steps=10, final_lr_ratio=0.0)
    ours = build_schedule(cfg, 100)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    sched = getattr(transformers, hf_name)(opt, num_warmup_steps=10, num_training_steps=100)
    theirs = []
    for _ in range(100):
        theirs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    np.testing.assert_allclose([float(ours(i)) for i in range(100)], theirs, rtol=1e-5, atol=1e-10)


def test_schedule_floor_and_constant():
    cosine = build_schedule(OptimConfig(lr=1.0, warmup_steps=0, final_lr_ratio=0.1), 50)
    assert float(cosine(0)) == pytest.approx(1.0) and float(cosine(50)) == pytest.approx(0.1)
    constant = build_schedule(OptimConfig(lr=2.0, schedule="constant", warmup_steps=4), 50)
    assert [float(constant(i)) for i in (0, 2, 4, 40)] == pytest.approx([0.0, 1.0, 2.0, 2.0])
    with pytest.raises(ValueError, match="decay ends at step 5"):
        build_schedule(OptimConfig(warmup_steps=10, decay_steps=5), 100)


def test_adamw_with_clipping_and_masked_decay_matches_torch():
    torch = require("torch")
    rng = np.random.default_rng(0)
    params = {"layer": {"kernel": rng.normal(size=(4, 3)).astype(np.float32), "bias": rng.normal(size=(3,)).astype(np.float32)},
              "norm": {"scale": rng.normal(size=(3,)).astype(np.float32)}}
    grads = [jax.tree.map(lambda x: (rng.normal(size=x.shape) * 3).astype(np.float32), params) for _ in range(4)]
    cfg = OptimConfig(lr=1e-2, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1, clip_norm=1.0, schedule="constant")
    opt, _ = build_optimizer(cfg, 10)
    state = opt.init(params)
    ours = jax.tree.map(jnp.asarray, params)
    for g in grads:
        updates, state = opt.update(g, state, ours)
        ours = jax.tree.map(jnp.add, ours, updates)

    t = {k: torch.nn.Parameter(torch.tensor(v)) for k, v in
         {"kernel": params["layer"]["kernel"], "bias": params["layer"]["bias"], "scale": params["norm"]["scale"]}.items()}
    topt = torch.optim.AdamW([{"params": [t["kernel"]], "weight_decay": 0.1},
                              {"params": [t["bias"], t["scale"]], "weight_decay": 0.0}], lr=1e-2, betas=(0.9, 0.95), eps=1e-8)
    for g in grads:
        t["kernel"].grad = torch.tensor(g["layer"]["kernel"])
        t["bias"].grad = torch.tensor(g["layer"]["bias"])
        t["scale"].grad = torch.tensor(g["norm"]["scale"])
        torch.nn.utils.clip_grad_norm_(list(t.values()), 1.0)
        topt.step()
    np.testing.assert_allclose(ours["layer"]["kernel"], t["kernel"].detach().numpy(), atol=1e-6)
    np.testing.assert_allclose(ours["layer"]["bias"], t["bias"].detach().numpy(), atol=1e-6)
    np.testing.assert_allclose(ours["norm"]["scale"], t["scale"].detach().numpy(), atol=1e-6)


@pytest.mark.parametrize("name", ["adafactor", "lion"])
def test_other_optimizers_reduce_a_quadratic(name):
    lr = 0.05 if name == "lion" else 0.5
    opt, _ = build_optimizer(OptimConfig(name=name, lr=lr, schedule="constant", weight_decay=0.0), 100)
    params = {"w": jnp.full((8, 8), 3.0)}
    state = opt.init(params)
    loss = lambda p: jnp.sum(p["w"] ** 2)  # noqa: E731
    start = loss(params)
    for _ in range(50):
        updates, state = opt.update(jax.grad(loss)(params), state, params)
        params = jax.tree.map(jnp.add, params, updates)
    assert loss(params) < 0.1 * start


def test_bad_optim_config_names_the_field():
    with pytest.raises(ValueError, match="optim.lr"):
        OptimConfig(lr=0)
    with pytest.raises(ValueError, match="optim.no_decay"):
        OptimConfig(no_decay=("([",))
    with pytest.raises(ValueError, match="optim.name"):
        build_optimizer(OptimConfig(name="sgdx"), 10)

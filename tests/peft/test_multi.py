"""Named adapters on one base: add / select / disable / delete / update / combine, and the
adapter-free reference view used inside a jitted step."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxtune.models import Model
from jaxtune.models.presets import preset
from jaxtune.peft import LoraConfig, LoraWeight, apply_lora, merge
from jaxtune.peft.core import base_model
from jaxtune.peft.multi import AdapterSet, attach_adapter, extract_adapter

CFG = preset("tiny-llama")
MODEL = Model(CFG)
BASE = MODEL.init(jax.random.key(0))
TOKENS = jax.random.randint(jax.random.key(1), (2, 10), 0, CFG.vocab_size)
logits = jax.jit(MODEL.apply)


def _trained_like(params, seed):
    """B randomised so each adapter changes the model differently."""
    keys = iter(jax.random.split(jax.random.key(seed), 256))
    return jax.tree.map(lambda x: LoraWeight(x.base, x.a, 0.05 * jax.random.normal(next(keys), x.b.shape), x.scale)
                        if isinstance(x, LoraWeight) else x, params, is_leaf=lambda x: isinstance(x, LoraWeight))


def _adapter(seed, rank=4, targets=("attention",)):
    return _trained_like(apply_lora(BASE, LoraConfig(rank=rank, alpha=2 * rank, targets=targets), jax.random.key(seed)), seed)


def test_select_disable_delete_update():
    a, b = _adapter(10), _adapter(11, rank=2, targets=("mlp",))
    adapters = AdapterSet.from_params(a, "a").add("b", b)
    assert adapters.names == ("a", "b")
    np.testing.assert_array_equal(logits(adapters.params("a"), TOKENS), logits(a, TOKENS))
    np.testing.assert_array_equal(logits(adapters.params("b"), TOKENS), logits(b, TOKENS))
    np.testing.assert_array_equal(logits(adapters.params(None), TOKENS), logits(BASE, TOKENS))
    assert float(jnp.max(jnp.abs(logits(a, TOKENS) - logits(b, TOKENS)))) > 1e-3
    # the base arrays are shared, not copied
    assert adapters.params("a")["embed"]["embedding"] is adapters.params("b")["embed"]["embedding"]

    a2 = _adapter(12)
    updated = adapters.update("a", a2)
    np.testing.assert_array_equal(logits(updated.params("a"), TOKENS), logits(a2, TOKENS))
    fewer = updated.delete("b")
    assert fewer.names == ("a",)
    with pytest.raises(KeyError, match="no adapter named 'b'"):
        fewer.params("b")
    with pytest.raises(ValueError, match="exists already"):
        adapters.add("a", a2)
    other = Model(CFG.replace(hidden_size=32, head_dim=8, intermediate_size=64)).init(jax.random.key(0))
    with pytest.raises(ValueError, match="different model|shape"):
        adapters.add("c", apply_lora(other, LoraConfig(rank=2), jax.random.key(3)))
    with pytest.raises(ValueError, match="carries no adapter"):
        adapters.add("c", BASE)


def test_extract_attach_round_trip():
    a = _adapter(13)
    piece = extract_adapter(a)
    assert all(leaf.base is None for leaf in piece["leaves"].values())
    back = attach_adapter(base_model(a), piece)
    assert jax.tree.structure(back) == jax.tree.structure(a)
    with pytest.raises(ValueError, match="already carries"):
        attach_adapter(a, piece)


@pytest.mark.parametrize("how", ["cat", "svd"])
def test_weighted_combination_equals_weighted_sum_of_updates(how):
    a, b = _adapter(20, rank=4), _adapter(21, rank=2)
    adapters = AdapterSet.from_params(a, "a").add("b", b)
    weights = {"a": 0.7, "b": -0.4}
    rank = 6 if how == "svd" else None  # full rank of the sum: exact too
    mixed = adapters.combine(weights, "mix", how=how, rank=rank).params("mix")
    path = ("layers_1", "attn", "q_proj", "kernel")

    def delta(p):
        leaf = p[path[0]][path[1]][path[2]][path[3]]
        return leaf.scale * (leaf.a @ leaf.b)

    expected = 0.7 * delta(a) - 0.4 * delta(b)
    np.testing.assert_allclose(delta(mixed), expected, atol=1e-6)
    # the combined model == base + the weighted updates, merged by hand
    by_hand = jax.tree.map(lambda x, y, z: x + 0.7 * (y - x) - 0.4 * (z - x), BASE, merge(a), merge(b))
    np.testing.assert_allclose(logits(mixed, TOKENS), logits(by_hand, TOKENS), atol=1e-4)


def test_truncated_svd_combination_is_the_best_low_rank_fit():
    a, b = _adapter(30, rank=4), _adapter(31, rank=4)
    adapters = AdapterSet.from_params(a, "a").add("b", b)
    exact = adapters.combine({"a": 1.0, "b": 1.0}, "x").params("x")
    errors = []
    for r in (2, 4, 8):
        approx = adapters.combine({"a": 1.0, "b": 1.0}, "x", how="svd", rank=r).params("x")
        leaf_e, leaf_a = exact["layers_0"]["attn"]["v_proj"]["kernel"], approx["layers_0"]["attn"]["v_proj"]["kernel"]
        d_e = leaf_e.scale * leaf_e.a @ leaf_e.b
        d_a = leaf_a.scale * leaf_a.a @ leaf_a.b
        errors.append(float(jnp.linalg.norm(d_e - d_a)))
        s = jnp.linalg.svd(d_e, compute_uv=False)
        np.testing.assert_allclose(errors[-1], float(jnp.sqrt(jnp.sum(s[r:] ** 2))), rtol=1e-3, atol=1e-6)  # Eckart-Young
    assert errors[0] > errors[1] > 0 and errors[2] < 1e-5


def test_combine_refuses_mismatched_adapters():
    adapters = AdapterSet.from_params(_adapter(40), "a").add("m", _adapter(41, targets=("mlp",)))
    with pytest.raises(ValueError, match="different kernels"):
        adapters.combine({"a": 0.5, "m": 0.5}, "x")


def test_reference_model_inside_one_jitted_function():
    """A DPO/PPO step computes policy and reference outputs from one tree: the reference is
    base_model(params), with no second copy of the weights."""
    a = _adapter(50)

    @jax.jit
    def both(params, tokens):
        return MODEL.apply(params, tokens), MODEL.apply(base_model(params), tokens)

    policy, reference = both(a, TOKENS)
    np.testing.assert_allclose(policy, logits(a, TOKENS), atol=1e-6)
    np.testing.assert_allclose(reference, logits(BASE, TOKENS), atol=1e-6)

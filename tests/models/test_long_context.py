"""Long-context memory levers of the model: the sequence-chunked MLP and block inputs offloaded to
host memory (``remat: offload``) compute exactly what the plain model does, and keep what they say."""

from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxtune.models import Model, ModelConfig
from jaxtune.models import layers
from jaxtune.train.memory import saved_activations
from jaxtune.utils.platform import lowering_for

CFG = ModelConfig(vocab_size=97, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                  intermediate_size=80, initializer_range=0.2)
TOKENS = jax.random.randint(jax.random.key(1), (2, 40), 0, 97)
SEGMENTS = jnp.asarray(np.repeat([[1] * 25 + [2] * 12 + [0] * 3], 2, axis=0), jnp.int32)  # packed + padding


@pytest.fixture(scope="module")
def params():
    return Model(CFG).init(jax.random.key(0))


def _loss(params, cfg):
    return jnp.sum(Model(cfg).apply(params, TOKENS, segment_ids=SEGMENTS) ** 2) * 1e-3


_value_and_grad = jax.jit(jax.value_and_grad(_loss), static_argnums=1)


@pytest.fixture(scope="module")
def reference(params):
    with jax.default_matmul_precision("highest"):
        return _value_and_grad(params, CFG)


@pytest.mark.parametrize("changes", [dict(mlp_chunk_tokens=16), dict(mlp_chunk_tokens=7, remat="full"),
                                     dict(remat="offload"), dict(remat="offload", mlp_chunk_tokens=30)],
                         ids=["chunked-mlp", "chunked-mlp-uneven-remat", "offload", "offload-chunked"])
def test_values_and_gradients_equal_the_plain_model(params, reference, changes):
    """Chunk sizes that do not divide the 80 tokens (padding path) as well as ones that do."""
    ref, ref_grad = reference
    with jax.default_matmul_precision("highest"):
        got, grad = _value_and_grad(params, CFG.replace(**changes))
    np.testing.assert_allclose(got, ref, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(grad), jax.tree.leaves(ref_grad)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(b))))


def _residuals(params, cfg):
    return saved_activations(lambda p: _loss(p, cfg), params)


def test_chunked_mlp_keeps_no_intermediate_tensor_of_the_whole_sequence(params):
    per_token_intermediate = lambda res: [r for r in res if CFG.intermediate_size in r[0] and int(np.prod(r[0])) >= 80 * 80]  # noqa: E731
    assert per_token_intermediate(_residuals(params, CFG))  # the plain MLP keeps [2, 40, 80] tensors
    assert not per_token_intermediate(_residuals(params, CFG.replace(mlp_chunk_tokens=16)))


def test_offload_keeps_every_block_input_in_host_memory(params):
    """Under remat=offload the [batch, seq, hidden] values kept are the blocks' inputs, on host, and on
    the device only the trunk's output and its final norm (the LM head's input), outside the blocks."""
    res = _residuals(params, CFG.replace(remat="offload"))
    hidden = [r for r in res if r[0] == (2, 40, CFG.hidden_size)]
    assert len([r for r in hidden if r[3]]) == CFG.num_layers, res
    assert len([r for r in hidden if not r[3]]) <= 2, res
    full = _residuals(params, CFG.replace(remat="full"))  # the same values, all on the device
    assert not any(r[3] for r in full) and len([r for r in full if r[0] == (2, 40, CFG.hidden_size)]) == len(hidden)


def test_offload_is_refused_where_the_device_has_no_host_memory(monkeypatch):
    device = SimpleNamespace(device_kind="fake accelerator", platform="fake",
                             addressable_memories=lambda: [SimpleNamespace(kind="device")])
    with pytest.raises(ValueError, match=r"remat=offload \(train.remat\).*fake accelerator.*memory kinds: device"):
        layers.check_host_offload(device)
    layers.check_host_offload()  # this CPU has pinned host memory
    def refuse(device=None):
        raise ValueError("no host memory")

    monkeypatch.setattr(layers, "check_host_offload", refuse)
    with pytest.raises(ValueError, match="no host memory"):
        Model(CFG.replace(remat="offload")).apply(Model(CFG).init(jax.random.key(0)), TOKENS)


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_offload_lowers_for_accelerators_with_one_host_placement_per_block(params, platform):
    """Lowered from this CPU for a GPU / TPU, every block's input is annotated for pinned host memory
    (XLA's host-offload passes then schedule the copies, overlapped with compute)."""
    cfg = CFG.replace(remat="offload", attention_impl="blockwise")
    grad = jax.jit(jax.grad(lambda p: _loss(p, cfg)))
    with lowering_for(platform):
        text = grad.trace(params).lower(lowering_platforms=(platform,)).as_text()
    assert text.count('"pinned_host"') == CFG.num_layers, text.count("pinned_host")

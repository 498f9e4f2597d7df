"""Context parallelism, in-process (traced against an abstract mesh, nothing compiled): the sequence
split of activations, the attention's shard_map and its collectives, the clear errors. Equality
with single-device training runs on 8 fake devices in tests/train/test_sharding_equivalence.py."""

import jax
import jax.numpy as jnp
from jax.sharding import AbstractMesh
import pytest

from jaxtune.models import Model, ModelConfig
from jaxtune.models.attention import attend
from jaxtune.models.masks import MaskInfo
from jaxtune.ops import linear
from jaxtune.parallel import activation_mesh, constrain
from jaxtune.parallel.mesh import AXES
from jaxtune.train.config import TrainConfig
from jaxtune.train.batch_checks import check_batch_layout
from jaxtune.train.losses import token_cross_entropy

MESH = AbstractMesh((2, 1, 4, 1), AXES)  # data=2, context=4


def _mask(seq, batch=2, **kw):
    seg = jnp.ones((batch, seq), jnp.int32)
    index = jnp.arange(seq, dtype=jnp.int32)
    return MaskInfo(seg, seg, index, index, **kw)


def _qkv(seq, batch=2):
    return jnp.ones((batch, seq, 4, 8)), jnp.ones((batch, seq, 2, 8)), jnp.ones((batch, seq, 2, 8))


def _eqns(eqns):
    """Every equation of ``eqns`` and of the jaxprs nested in their params, depth first."""
    for e in eqns:
        yield e
        for value in e.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                sub = getattr(sub, "jaxpr", sub)
                if hasattr(sub, "eqns"):
                    yield from _eqns(sub.eqns)


def _specs(jaxpr) -> list[str]:
    return [str(e.params["sharding"].spec) for e in jaxpr.eqns if e.primitive.name == "sharding_constraint"]


def test_constrain_splits_the_sequence_over_context_where_it_divides():
    def f(x):
        with activation_mesh(MESH):
            return constrain(x), constrain(x[:, :1]), constrain(x, None)

    specs = _specs(jax.make_jaxpr(f)(jnp.ones((4, 8, 3))).jaxpr)
    assert specs == ["P(('data', 'fsdp'), 'context')", "P(('data', 'fsdp'),)", "P(('data', 'fsdp'),)"]


def test_projections_keep_batch_and_sequence_apart_under_context_parallelism():
    """A [batch, seq] pair flattened into one dimension could not stay split by sequence: under a
    context mesh the linear op contracts the 3-D activations as they are (elsewhere it flattens)."""
    x, w = jnp.ones((4, 8, 3)), jnp.ones((3, 5))

    def f(mesh):
        with activation_mesh(mesh):
            return [e.primitive.name for e in jax.make_jaxpr(lambda x: linear(x, w))(x).jaxpr.eqns]

    assert "reshape" not in f(MESH)
    assert "reshape" in f(AbstractMesh((2, 1, 1, 1), AXES)) and "reshape" in f(None)


def test_attention_runs_on_sequence_blocks_and_gathers_keys_over_context():
    q, k, v = _qkv(16)

    def loss(q, k, v):
        with activation_mesh(MESH):
            return jnp.sum(attend(q, k, v, _mask(16, window=4), "blockwise"))

    jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v).jaxpr
    maps = [e for e in jaxpr.eqns if e.primitive.name == "shard_map"]
    assert len(maps) == 2  # forward, and the transposed one of the backward pass
    body = maps[0].params["jaxpr"]
    assert [tuple(x.aval.shape) for x in body.invars[:1]] == [(1, 4, 4, 8)]  # batch / data, seq / context
    collectives = [(e.primitive.name, e.params.get("axis_name", e.params.get("axes"))) for e in _eqns(maps)
                   if e.primitive.name in ("all_gather", "reduce_scatter", "psum", "ppermute", "all_to_all")]
    # K and V gathered in the forward pass and again in the backward one (not kept in between);
    # dK and dV reduce-scattered back to their blocks.
    assert sorted(collectives) == [("all_gather", ("context",))] * 4 + [("reduce_scatter", ("context",))] * 2


def test_kv_cache_decoding_is_not_split():
    q, k, v = _qkv(1)
    cache_k, cache_v = jnp.ones((2, 16, 2, 8)), jnp.ones((2, 16, 2, 8))
    seg = jnp.ones((2, 16), jnp.int32)
    mask = MaskInfo(jnp.ones((2, 1), jnp.int32), seg, jnp.array([3]), jnp.arange(16), cached=True)

    def f():
        with activation_mesh(MESH):
            return attend(q, cache_k, cache_v, mask, "blockwise")

    assert "shard_map" not in str(jax.make_jaxpr(f)())


def test_sequence_that_does_not_split_is_refused_with_the_keys_to_change():
    q, k, v = _qkv(30)
    with activation_mesh(MESH), pytest.raises(ValueError, match=r"30 tokens .* mesh.context=4 .*train.seq_len"):
        jax.eval_shape(lambda: attend(q, k, v, _mask(30), "auto"))
    with pytest.raises(ValueError, match=r"train.seq_len \(30\) must divide by mesh.context \(4\)"):
        check_batch_layout(TrainConfig(batch_size=4, seq_len=30), MESH)
    check_batch_layout(TrainConfig(batch_size=4, seq_len=32), MESH)


def test_chunked_loss_keeps_each_device_share_of_the_sequence():
    """Under a context mesh the chunked cross-entropy takes strided chunks of each row (no flattening
    of a split [batch, seq]) and sums exactly what the contiguous chunks do without a mesh."""
    cfg = ModelConfig(vocab_size=32, hidden_size=8, num_layers=1, num_heads=2, num_kv_heads=2, head_dim=4)
    params = Model(cfg).init(jax.random.key(0))
    hidden = jax.random.normal(jax.random.key(1), (2, 40, 8))
    targets = jax.random.randint(jax.random.key(2), (2, 40), 0, 32)
    mask = (jnp.arange(40) < 37)[None].repeat(2, 0)
    loss = lambda h: token_cross_entropy(params, h, targets, mask, Model(cfg), chunk_tokens=16)  # noqa: E731
    plain = loss(hidden)

    def split(h):
        with activation_mesh(MESH):
            return loss(h)

    reshapes = [e for e in _eqns(jax.make_jaxpr(split)(hidden).jaxpr.eqns)
                if e.primitive.name == "reshape" and e.invars[0].aval.shape[:2] == (2, 40)]
    assert not [e for e in reshapes if e.outvars[0].aval.shape[0] == 80], reshapes
    assert jnp.allclose(jnp.stack(jax.jit(split)(hidden)), jnp.stack(plain), rtol=1e-6)

"""Sharding rules: specs per family, typed leaves derive from their base, non-dividing axes dropped."""

import dataclasses

import jax
import jax.numpy as jnp
from jax.sharding import AbstractMesh, PartitionSpec as P
import numpy as np
import pytest

from jaxtune.models import Model
from jaxtune.models.presets import preset
from jaxtune.ops import register_linear
from jaxtune.parallel import MeshConfig, constrain, make_mesh, param_specs, register_sharding
from tests.hf_reference import CONFIGS

MESH = AbstractMesh((2, 2, 2), ("data", "fsdp", "tensor"))


def _abstract(cfg):
    return jax.eval_shape(Model(cfg).init, jax.random.key(0))


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_every_family_gets_a_spec_for_every_leaf(name):
    from jaxtune.interop.hf_config import from_hf_config

    cfg = from_hf_config(CONFIGS[name]().to_dict()).replace(param_dtype="float32")
    params = _abstract(cfg)
    specs = param_specs(params, MESH, warn=False)
    flat = dict((jax.tree_util.keystr(p), s) for p, s in jax.tree_util.tree_leaves_with_path(specs, is_leaf=lambda x: isinstance(x, P)))
    assert len(flat) == len(jax.tree.leaves(params))
    for path, spec in flat.items():
        if path.endswith("['kernel']") and "proj" in path:  # (vocab 97 is odd: the head drops tensor)
            assert len(spec) == 2 and set(spec) == {"fsdp", "tensor"}, path  # sharded on both axes
        if "norm" in path:
            assert spec == P(), path


def test_projection_specs_and_bias_follow_the_output_axis():
    params = _abstract(preset("tiny-gpt2"))
    specs = param_specs(params, MESH, warn=False)
    attn = specs["layers_0"]["attn"]
    assert attn["q_proj"]["kernel"] == P("fsdp", "tensor") and attn["q_proj"]["bias"] == P("tensor")
    assert attn["o_proj"]["kernel"] == P("tensor", "fsdp") and attn["o_proj"]["bias"] == P()
    assert specs["layers_0"]["mlp"]["down_proj"]["kernel"] == P("tensor", "fsdp")
    assert specs["pos_embed"]["embedding"] == P(None, "fsdp")


def test_axes_that_do_not_divide_are_dropped_with_a_warning():
    params = _abstract(preset("tiny-llama"))  # vocab 259: odd
    with pytest.warns(UserWarning, match="embed/embedding dim 259 not divisible by tensor=2"):
        specs = param_specs(params, MESH)
    assert specs["embed"]["embedding"] == P(None, "fsdp")
    assert specs["lm_head"]["kernel"] == P("fsdp")


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class ToyLoRA:
    """A typed leaf defined by a test: base [in, out], a [in, r], b [r, out]."""

    base: jax.Array
    a: jax.Array
    b: jax.Array


@register_linear(ToyLoRA)
def _toy_linear(x, w, *, dtype, rng=None):
    return (x @ w.base + (x @ w.a) @ w.b).astype(dtype or x.dtype)


@register_sharding(ToyLoRA)
def _toy_specs(w, spec):
    in_axis = spec[0] if len(spec) > 0 else None
    out_axis = spec[1] if len(spec) > 1 else None
    return ToyLoRA(base=spec, a=P(in_axis, None), b=P(None, out_axis))


def test_typed_leaf_specs_derive_from_the_base_weight():
    params = Model(preset("tiny-llama")).init(jax.random.key(0))
    kernel = params["layers_0"]["attn"]["q_proj"]["kernel"]
    params["layers_0"]["attn"]["q_proj"]["kernel"] = ToyLoRA(kernel, jnp.zeros((128, 4)), jnp.zeros((4, 128)))
    down = params["layers_1"]["mlp"]["down_proj"]["kernel"]
    params["layers_1"]["mlp"]["down_proj"]["kernel"] = ToyLoRA(down, jnp.zeros((352, 4)), jnp.zeros((4, 128)))
    specs = param_specs(params, MESH, warn=False)
    q = specs["layers_0"]["attn"]["q_proj"]["kernel"]
    assert isinstance(q, ToyLoRA)
    assert (q.base, q.a, q.b) == (P("fsdp", "tensor"), P("fsdp"), P(None, "tensor"))
    d = specs["layers_1"]["mlp"]["down_proj"]["kernel"]
    assert (d.base, d.a, d.b) == (P("tensor", "fsdp"), P("tensor"), P(None, "fsdp"))
    # The model still runs through the one linear op with the typed leaves in place.
    logits = Model(preset("tiny-llama")).apply(params, jnp.zeros((1, 4), jnp.int32))
    assert logits.shape == (1, 4, 259) and bool(jnp.all(jnp.isfinite(logits)))


def test_mesh_config_resolves_and_names_bad_sizes():
    # (data, fsdp, context, tensor): AXES order
    assert MeshConfig(data=-1, fsdp=2, tensor=2).resolve(8) == (2, 2, 1, 2)
    assert MeshConfig(data=1, fsdp=-1).resolve(8) == (1, 8, 1, 1)
    assert MeshConfig(data=2, fsdp=1, context=-1).resolve(8) == (2, 1, 4, 1)
    with pytest.raises(ValueError, match="mesh.context: size must be positive or -1, got 0"):
        MeshConfig(context=0).resolve(8)
    with pytest.raises(ValueError, match="at most one axis may be -1"):
        MeshConfig(data=-1, fsdp=-1).resolve(8)
    with pytest.raises(ValueError, match="needs 4 devices, 8 available"):
        MeshConfig(data=2, fsdp=2).resolve(8)
    with pytest.raises(ValueError, match="do not divide"):
        MeshConfig(data=-1, fsdp=3).resolve(8)
    mesh = make_mesh(MeshConfig())
    assert dict(mesh.shape) == {"data": len(jax.devices()), "fsdp": 1, "context": 1, "tensor": 1}


def test_constrain_is_a_no_op_without_a_mesh():
    x = jnp.ones((4, 3, 2))
    assert constrain(x) is x
    np.testing.assert_array_equal(jax.jit(constrain)(x), x)


def test_split_typed_leaf_keeps_none_halves():
    from jaxtune.utils.partition import split

    params = Model(preset("tiny-llama")).init(jax.random.key(0))
    kernel = params["layers_0"]["attn"]["q_proj"]["kernel"]
    params["layers_0"]["attn"]["q_proj"]["kernel"] = ToyLoRA(kernel, jnp.zeros((128, 4)), jnp.zeros((4, 128)))
    mask = jax.tree.map(lambda _: False, params)
    mask["layers_0"]["attn"]["q_proj"]["kernel"] = ToyLoRA(False, True, True)
    trainable, frozen = split(params, mask)
    t = param_specs(trainable, MESH, warn=False)["layers_0"]["attn"]["q_proj"]["kernel"]
    f = param_specs(frozen, MESH, warn=False)["layers_0"]["attn"]["q_proj"]["kernel"]
    assert (t.base, t.a, t.b) == (None, P("fsdp"), P(None, "tensor"))
    assert (f.base, f.a, f.b) == (P("fsdp", "tensor"), None, None)

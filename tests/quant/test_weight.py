"""Quantized weight leaves: bitsandbytes' bytes for an nn.Linear weight, storage size, the linear op,
the quantize transform on a model, int8 / int4 against closed forms, derived sharding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AbstractMesh, PartitionSpec as P

from jaxtune.models import Model
from jaxtune.models.presets import preset
from jaxtune.ops import linear
from jaxtune.parallel import param_specs
from jaxtune.quant import QuantConfig, QuantizedWeight, bits_per_parameter, dequantize, quantize, quantize_kernel
from jaxtune.quant.weight import quantized_bytes
from tests.reference import require

CFG = preset("tiny-llama")
MODEL = Model(CFG)
PARAMS = MODEL.init(jax.random.key(0))
TOKENS = jax.random.randint(jax.random.key(1), (2, 10), 0, CFG.vocab_size)


def _kernel(n_in, n_out, seed=0, dtype=jnp.float32):
    return (jax.random.normal(jax.random.key(seed), (n_in, n_out)) * 0.05).astype(dtype)


@pytest.mark.parametrize("kind,double_quant", [("nf4", True), ("nf4", False), ("fp4", True)])
@pytest.mark.parametrize("shape", [(256, 96), (100, 48)])  # 100 inputs: blocks straddle rows (flat layout)
def test_kernel_bytes_are_bitsandbytes_for_the_linear_weight(kind, double_quant, shape):
    torch = require("torch")
    F = require("bitsandbytes.functional")
    w = _kernel(*shape)
    q = quantize_kernel(w, QuantConfig(kind=kind, double_quant=double_quant))
    # nn.Linear stores W^T [out, in]; bitsandbytes flattens that row-major
    ref_q, ref_state = F.quantize_4bit(torch.from_numpy(np.asarray(w).T.copy()), blocksize=64, quant_type=kind,
                                       compress_statistics=double_quant)
    np.testing.assert_array_equal(np.asarray(q.codes).reshape(-1), ref_q.numpy().reshape(-1))
    assert q.codes.ndim == (2 if shape[0] % 64 == 0 else 1)
    if not double_quant:
        np.testing.assert_array_equal(np.asarray(q.scales).reshape(-1), ref_state.absmax.numpy())
    ref = F.dequantize_4bit(ref_q, ref_state).numpy() if shape[0] % 64 == 0 else None
    deq = np.asarray(q.dequantize(jnp.float32))
    assert deq.shape == shape
    if ref is not None:  # bitsandbytes' CPU dequantize of the same state: equal up to the double-quant offset's ulp
        np.testing.assert_allclose(deq, ref.T, rtol=0, atol=2e-6)


def test_nf4_double_quant_storage_is_4_127_bits_per_parameter():
    shapes = jax.eval_shape(lambda w: quantize_kernel(w, QuantConfig()), jax.ShapeDtypeStruct((4096, 4096), jnp.bfloat16))
    expected = 4096 * 4096 // 2 + 4096 * 4096 // 64 + 4 * (4096 * 4096 // 64 // 256) + 4
    assert shapes.nbytes == expected == quantized_bytes(QuantConfig(), 4096, 4096)
    assert 8 * shapes.nbytes / (4096 * 4096) == pytest.approx(4 + 8 / 64 + 32 / (64 * 256), abs=1e-5)  # 4.1270
    plain = jax.eval_shape(lambda w: quantize_kernel(w, QuantConfig(double_quant=False)),
                           jax.ShapeDtypeStruct((4096, 4096), jnp.bfloat16))
    assert 8 * plain.nbytes / (4096 * 4096) == pytest.approx(4.5)
    q = quantize(PARAMS, QuantConfig(blocksize=32))
    assert 4.25 < bits_per_parameter(q) < 4.26  # 4 + 8/32 + nested


def test_linear_op_on_a_quantized_kernel():
    w = _kernel(128, 80, seed=3)
    x = jax.random.normal(jax.random.key(4), (3, 5, 128))
    for cfg in (QuantConfig(), QuantConfig(kind="fp4"), QuantConfig(kind="int8", double_quant=False),
                QuantConfig(kind="int4", double_quant=False)):
        q = quantize_kernel(w, cfg)
        y = linear(x, q, dtype=jnp.float32)
        np.testing.assert_allclose(y, x @ q.dequantize(jnp.float32), rtol=1e-5, atol=1e-5)
        rel = float(jnp.linalg.norm(y - x @ w) / jnp.linalg.norm(x @ w))
        assert rel < {"nf4": 0.12, "fp4": 0.16, "int8": 0.01, "int4": 0.16}[cfg.kind], (cfg.kind, rel)
        y16 = linear(x.astype(jnp.bfloat16), q, dtype=jnp.bfloat16)
        assert y16.dtype == jnp.bfloat16
        np.testing.assert_allclose(y16.astype(jnp.float32), y, rtol=0.05, atol=0.05)


def test_int8_matches_bitsandbytes_vectorwise_and_int4_the_closed_form():
    torch = require("torch")
    F = require("bitsandbytes.functional")
    w = _kernel(96, 40, seed=5)
    q = quantize_kernel(w, QuantConfig(kind="int8", double_quant=False))
    ref_codes, ref_stats, _ = F.int8_vectorwise_quant(torch.from_numpy(np.asarray(w).T.copy()))
    np.testing.assert_array_equal(np.asarray(q.codes), ref_codes.numpy())
    np.testing.assert_array_equal(np.asarray(q.scales), ref_stats.numpy())
    np.testing.assert_array_equal(np.asarray(q.dequantize_t(jnp.float32)),
                                  F.int8_vectorwise_dequant(ref_codes, ref_stats).numpy())
    # int4: symmetric per group of 64 inputs, scale absmax/7, codes in [-7, 7]
    q4 = quantize_kernel(w, QuantConfig(kind="int4", double_quant=False, blocksize=32))
    wt = np.asarray(w).T.reshape(40, 3, 32)
    scale = np.abs(wt).max(-1, keepdims=True) / 7
    expect = np.clip(np.round(wt / scale), -7, 7) * scale
    np.testing.assert_allclose(np.asarray(q4.dequantize_t(jnp.float32)), expect.reshape(40, 96), rtol=1e-6, atol=1e-7)
    assert q4.codes.dtype == jnp.uint8 and q4.codes.shape == (40, 48)


def test_quantize_transform_on_a_model():
    q = quantize(PARAMS, QuantConfig())
    kernels = [x for x in jax.tree.leaves(q, is_leaf=lambda x: isinstance(x, QuantizedWeight))
               if isinstance(x, QuantizedWeight)]
    assert len(kernels) == 7 * CFG.num_layers  # all-linear; the LM head and embeddings stay dense
    assert isinstance(q["lm_head"]["kernel"], jax.Array) and isinstance(q["embed"]["embedding"], jax.Array)
    ref = MODEL.apply(PARAMS, TOKENS)
    out = jax.jit(MODEL.apply)(q, TOKENS)
    np.testing.assert_allclose(out, MODEL.apply(dequantize(q), TOKENS), rtol=1e-5, atol=1e-5)
    # 4-bit noise through 4 random layers: logits move by ~24% of their spread (int8: ~2%)
    spread = jnp.linalg.norm(ref - ref.mean(-1, keepdims=True))
    assert float(jnp.linalg.norm(out - ref) / spread) < 0.3
    out8 = MODEL.apply(quantize(PARAMS, QuantConfig(kind="int8", double_quant=False)), TOKENS)
    assert float(jnp.linalg.norm(out8 - ref) / spread) < 0.03
    with pytest.raises(ValueError, match="already quantized"):
        quantize(q, QuantConfig())
    with pytest.raises(ValueError, match="only .../kernel paths"):
        quantize(PARAMS, QuantConfig(targets=(r"embed/embedding$",)))
    with pytest.raises(ValueError, match="match no kernel"):
        quantize(PARAMS, QuantConfig(targets=(r"nothing_here",)))
    with pytest.raises(ValueError, match="int4 groups of 64 do not divide"):
        quantize(PARAMS, QuantConfig(kind="int4", double_quant=False))  # down_proj has 352 inputs
    with pytest.raises(ValueError, match="double_quant applies to nf4/fp4"):
        QuantConfig(kind="int8")


def test_quantized_specs_follow_the_kernel():
    mesh = AbstractMesh((2, 2, 2), ("data", "fsdp", "tensor"))
    q = jax.eval_shape(lambda p: quantize(p, QuantConfig()), PARAMS)
    specs = param_specs(q, mesh, warn=False)
    qp = specs["layers_0"]["attn"]["q_proj"]["kernel"]  # kernel [fsdp, tensor] -> stored [out, in]: [tensor, fsdp]
    assert qp.codes == P("tensor", "fsdp") and qp.scales == P("tensor", "fsdp") and qp.nested_scales == P() and qp.offset == P()
    # (scales [128, 2]: 2 blocks of 64 along the inputs, split by fsdp=2)
    o = specs["layers_0"]["attn"]["o_proj"]["kernel"]
    assert o.codes == P("fsdp", "tensor")
    down = specs["layers_0"]["mlp"]["down_proj"]["kernel"]  # 352 inputs: flat layout, split along out (fsdp)
    assert q["layers_0"]["mlp"]["down_proj"]["kernel"].codes.ndim == 1 and down.codes == P("fsdp")

"""Code tables and blockwise quantization against bitsandbytes (its CPU build) and closed forms."""

from statistics import NormalDist

import jax.numpy as jnp
import numpy as np
import pytest

from jaxtune.quant import codes as C
from tests.reference import require

torch = require("torch")
F = require("bitsandbytes.functional")
bnb_default_ops = require("bitsandbytes.backends.default.ops")


def _rng(seed=0):
    return np.random.default_rng(seed)


def test_code_tables_are_bitsandbytes_and_nf4_is_the_papers_normal_quantiles():
    np.testing.assert_array_equal(C.NF4, F.get_4bit_type("nf4", device="cpu").numpy())
    np.testing.assert_array_equal(C.FP4, F.get_4bit_type("fp4", device="cpu").numpy())
    np.testing.assert_array_equal(C.DYNAMIC_SIGNED, F.create_dynamic_map(signed=True).numpy())
    np.testing.assert_array_equal(C.DYNAMIC_UNSIGNED, F.create_dynamic_map(signed=False).numpy())
    # NF4 (QLoRA, appendix E): 8 positive and 7 negative N(0,1) quantiles between the offset
    # 0.9677 and 1/2, an exact zero, normalised to [-1, 1].
    ppf = NormalDist().inv_cdf
    offset = 0.9677083
    pos = [ppf(offset + (0.5 - offset) * i / 8) for i in range(8)]
    neg = [-ppf(offset + (0.5 - offset) * i / 7) for i in range(7)]
    values = np.sort(np.array(pos + [0.0] + neg))
    np.testing.assert_allclose(C.NF4, values / np.abs(values).max(), atol=2e-7)


CASES = [(64, 128), (37, 91), (3, 5), (300, 257), (1, 1)]


@pytest.mark.parametrize("kind", ["nf4", "fp4"])
@pytest.mark.parametrize("blocksize", [32, 64, 256, 4096])
def test_quantize_4bit_is_byte_identical_to_bitsandbytes(kind, blocksize):
    rng = _rng(blocksize)
    for shape in CASES:
        x = (rng.standard_normal(shape) * rng.uniform(0.01, 3.0)).astype(np.float32)
        x.flat[0] = 0.0  # exact zeros (and FP4's two zero codes) take the same code as in bitsandbytes
        ref_q, ref_state = F.quantize_4bit(torch.from_numpy(x), blocksize=blocksize, quant_type=kind)
        packed, absmax = C.quantize_4bit(jnp.asarray(x.reshape(-1)), blocksize, kind)
        np.testing.assert_array_equal(np.asarray(packed), ref_q.numpy().reshape(-1), err_msg=f"{shape}")
        np.testing.assert_array_equal(np.asarray(absmax), ref_state.absmax.numpy(), err_msg=f"{shape}")
        # dequantization equals bitsandbytes' reference (PyTorch) kernel bit for bit
        ref = bnb_default_ops._dequantize_4bit_compute(ref_q.reshape(-1), ref_state.absmax, ref_state.code, blocksize,
                                                       shape, torch.float32).numpy().reshape(-1)
        np.testing.assert_array_equal(np.asarray(C.dequantize_4bit(packed, absmax, x.size, blocksize, kind)), ref)


def test_bfloat16_input_quantizes_like_bitsandbytes():
    x = torch.randn(96, 64, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    ref_q, ref_state = F.quantize_4bit(x, blocksize=64, quant_type="nf4")
    packed, absmax = C.quantize_4bit(jnp.asarray(x.float().numpy().reshape(-1), jnp.bfloat16), 64, "nf4")
    np.testing.assert_array_equal(np.asarray(packed), ref_q.numpy().reshape(-1))
    np.testing.assert_array_equal(np.asarray(absmax), ref_state.absmax.numpy())


def _nearest(scaled, code):
    """Brute force: the index of the closest code value, ties to the lower index."""
    return np.argmin(np.abs(scaled[:, None].astype(np.float64) - code[None, :].astype(np.float64)), axis=1)


def test_blockwise_8bit_is_nearest_and_differs_from_bitsandbytes_cpu_only_where_that_is_farther():
    """bitsandbytes' CPU library finds the code by an approximate binary search; its reference
    kernel and CUDA kernel take the nearest value, as jaxtune does. Where the CPU build
    disagrees, its pick is strictly farther from the value."""
    rng = _rng(3)
    mismatches = total = 0
    for _ in range(6):
        x = (rng.standard_normal(4999) * 0.3).astype(np.float32)
        codes, absmax = C.quantize_blockwise(jnp.asarray(x), 256)
        codes, absmax = np.asarray(codes), np.asarray(absmax)
        ref_codes, ref_state = F.quantize_blockwise(torch.from_numpy(x), blocksize=256)
        ref_codes = ref_codes.numpy()
        np.testing.assert_array_equal(absmax, ref_state.absmax.numpy())
        scaled = np.clip(x * np.repeat(np.float32(1.0) / absmax, 256)[: x.size], -1, 1)
        np.testing.assert_array_equal(codes, _nearest(scaled, C.DYNAMIC_SIGNED))
        differ = codes != ref_codes
        code = C.DYNAMIC_SIGNED.astype(np.float64)
        assert np.all(np.abs(scaled[differ] - code[ref_codes[differ]]) > np.abs(scaled[differ] - code[codes[differ]]))
        mismatches += int(differ.sum())
        total += x.size
        # bitsandbytes' own codes dequantize identically
        np.testing.assert_array_equal(
            np.asarray(C.dequantize_blockwise(jnp.asarray(ref_codes), jnp.asarray(ref_state.absmax.numpy()), 256)),
            F.dequantize_blockwise(torch.from_numpy(ref_codes), ref_state).numpy())
    assert mismatches / total < 0.01


def test_double_quantization_matches_bitsandbytes():
    rng = _rng(4)
    x = rng.standard_normal((512, 320)).astype(np.float32)
    ref_q, ref_state = F.quantize_4bit(torch.from_numpy(x), blocksize=64, quant_type="nf4", compress_statistics=True)
    packed, absmax = C.quantize_4bit(jnp.asarray(x.reshape(-1)), 64, "nf4")
    np.testing.assert_array_equal(np.asarray(packed), ref_q.numpy().reshape(-1))  # packing ignores double quant
    codes, nested, offset = (np.asarray(a) for a in C.double_quantize(absmax))
    # the mean is summed in another order than torch's: within an ulp or two
    np.testing.assert_allclose(offset, ref_state.offset.numpy(), rtol=3e-7)
    np.testing.assert_allclose(nested, ref_state.state2.absmax.numpy(), rtol=1e-6)
    ref_codes = ref_state.absmax.numpy()
    assert np.mean(codes != ref_codes) < 0.01 and np.all(np.abs(codes.astype(int) - ref_codes.astype(int)) <= 1)
    # bitsandbytes' double-quantized state dequantizes identically through jaxtune
    mine = C.dequantize_4bit(jnp.asarray(ref_q.numpy().reshape(-1)),
                             C.double_dequantize(jnp.asarray(ref_codes), jnp.asarray(ref_state.state2.absmax.numpy()),
                                                 jnp.asarray(ref_state.offset.numpy())), x.size, 64, "nf4")
    absmax_ref = F.dequantize_blockwise(ref_state.absmax, ref_state.state2) + ref_state.offset
    ref = bnb_default_ops._dequantize_4bit_compute(ref_q.reshape(-1), absmax_ref, ref_state.code, 64, x.shape,
                                                   torch.float32).numpy().reshape(-1)
    np.testing.assert_array_equal(np.asarray(mine), ref)


def test_bad_blocksize_is_refused():
    with pytest.raises(ValueError, match="power of two from 32 to 4096"):
        C.quantize_4bit(jnp.ones(64), 48)

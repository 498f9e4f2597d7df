"""The Pallas TPU (Mosaic) quantized matmul kernels: in Pallas' interpreter against XLA's
dequantize-then-matmul (forward with and without the LoRA epilogue, the transposed kernel against
``jax.vjp`` of the reference), on a shape that is no tile multiple and on a multi-tile grid; lowering
to a Mosaic ``tpu_custom_call`` for every kind and op at a realistic shape (no TPU needed); bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from jaxtune.kernels import quant_matmul_tpu as T
from jaxtune.kernels.quant_matmul_tpu import TpuTiles, tiles_for
from jaxtune.quant import QuantConfig, quantize_kernel
from jaxtune.quant.matmul import code_table, kernel_scales

HIGHEST = jax.lax.Precision.HIGHEST
KINDS = ("nf4", "fp4", "int4", "int8")
# (M, N, K, tiles): odd sizes with the heuristic tiles (one K step, padded M and N), and a 3 x 3 x 3 grid
SHAPES = {"odd": (5, 200, 384, None), "multi": (40, 300, 768, TpuTiles(bm=16, bn=128, bk=256))}


def _inputs(kind, m, n, k, rank=8, seed=0):
    keys = jax.random.split(jax.random.key(seed), 5)
    x = jax.random.normal(keys[0], (m, k))
    w = jax.random.normal(keys[1], (k, n)) * 0.05
    q = quantize_kernel(w, QuantConfig(kind=kind, double_quant=kind in ("nf4", "fp4"), blocksize=64))
    xa = jax.random.normal(keys[2], (m, rank))
    b = jax.random.normal(keys[3], (rank, n)) * 0.1
    return x, q, xa, b, jax.random.normal(keys[4], (m, n))


def _kw(q):
    return dict(kind=q.kind, blocksize=q.blocksize, table=code_table(q.kind))


def _reference(x, q, xa=None, b=None, s=1.0):
    """XLA: dequantize (float32), then matmul at HIGHEST precision, plus the low-rank term."""
    y = jnp.matmul(x, q.dequantize_t(jnp.float32).T, precision=HIGHEST)
    return y if xa is None else y + s * jnp.matmul(xa, b, precision=HIGHEST)


def _close(got, want, dtype, what):
    """float32: elementwise to ~1e-4 relative (only the summation order differs: the dequantized
    values are the same float32 products). bfloat16 (operands rounded to 8 mantissa bits, unit
    roundoff 2^-9 ~ 0.2%, float32 accumulation): the relative Frobenius error is ~0.3%; bound 1%."""
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    assert got.shape == want.shape, what
    if dtype == jnp.float32:
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max(), err_msg=what)
    else:
        err = np.linalg.norm(got - want) / np.linalg.norm(want)
        assert err < 1e-2, f"{what}: relative error {err:.4f}"


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kind", KINDS)
def test_forward_with_and_without_lora_matches_xla(kind, shape):
    m, n, k, tiles = SHAPES[shape]
    x, q, xa, b, _ = _inputs(kind, m, n, k)
    plain = T.forward(x, q.codes, kernel_scales(q), n=n, tiles=tiles, interpret=True, **_kw(q))
    assert plain.dtype == jnp.float32
    _close(plain, _reference(x, q), jnp.float32, f"{kind} forward")
    fused = T.forward(x, q.codes, kernel_scales(q), n=n, xa=xa, b=b, lora_scale=2.0, tiles=tiles, interpret=True,
                      **_kw(q))
    _close(fused, _reference(x, q, xa, b, 2.0), jnp.float32, f"{kind} forward+lora")


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kind", KINDS)
def test_transposed_is_the_vjp_of_the_reference(kind, shape):
    m, n, k, tiles = SHAPES[shape]
    x, q, _, _, dy = _inputs(kind, m, n, k)
    dx = T.transposed(dy, q.codes, kernel_scales(q), k=k, tiles=tiles, interpret=True, **_kw(q))
    _, vjp = jax.vjp(lambda x: _reference(x, q), x)
    _close(dx, vjp(dy)[0], jnp.float32, f"{kind} transposed")


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_bfloat16_operands(kind):
    m, n, k, tiles = SHAPES["multi"]
    x, q, xa, b, dy = _inputs(kind, m, n, k)
    bf = jnp.bfloat16
    y = T.forward(x.astype(bf), q.codes, kernel_scales(q), n=n, xa=xa.astype(bf), b=b.astype(bf), lora_scale=2.0,
                  tiles=tiles, interpret=True, **_kw(q))
    assert y.dtype == bf
    _close(y, _reference(x, q, xa, b, 2.0), bf, f"{kind} bf16 forward+lora")
    dx = T.transposed(dy.astype(bf), q.codes, kernel_scales(q), k=k, tiles=tiles, out_dtype=jnp.float32,
                      interpret=True, **_kw(q))
    assert dx.dtype == jnp.float32
    _close(dx, jnp.matmul(dy, q.dequantize_t(jnp.float32), precision=HIGHEST), bf, f"{kind} bf16 transposed")


def test_tpu_interpreter_models_the_scratch_accumulator():
    """The TPU interpreter (VMEM scratch, sequential K axis) agrees on the multi-tile grid."""
    m, n, k, tiles = SHAPES["multi"]
    x, q, xa, b, _ = _inputs("nf4", m, n, k)
    y = T.forward(x, q.codes, kernel_scales(q), n=n, xa=xa, b=b, tiles=tiles, interpret=pltpu.InterpretParams(),
                  **_kw(q))
    _close(y, _reference(x, q, xa, b), jnp.float32, "nf4 forward+lora, TPU interpreter")


@pytest.mark.parametrize("kind", KINDS)
def test_lowers_to_a_mosaic_custom_call(kind):
    """Lowering for TPU (Mosaic) runs here without a TPU: every op, bf16, K=4096, N=1024, blocksize 64."""
    S, bf = jax.ShapeDtypeStruct, jnp.bfloat16
    n, k, bs, r = 1024, 4096, 64, 16
    codes = S((n, k) if kind == "int8" else (n, k // 2), jnp.int8 if kind == "int8" else jnp.uint8)
    scales = S((n,) if kind == "int8" else (n, k // bs), jnp.float32)
    kw = dict(kind=kind, blocksize=bs, table=code_table(kind))
    for m in (16, 512):
        ops = {
            "forward": (lambda x, c, s: T.forward(x, c, s, n=n, **kw), (S((m, k), bf), codes, scales)),
            "forward+lora": (lambda x, c, s, xa, b: T.forward(x, c, s, n=n, xa=xa, b=b, lora_scale=2.0, **kw),
                             (S((m, k), bf), codes, scales, S((m, r), bf), S((r, n), bf))),
            "transposed": (lambda dy, c, s: T.transposed(dy, c, s, k=k, **kw), (S((m, n), bf), codes, scales)),
        }
        for op, (f, args) in ops.items():
            try:
                exp = jax.export.export(jax.jit(f), platforms=["tpu"], disabled_checks=[
                    jax.export.DisabledSafetyCheck.custom_call("tpu_custom_call")])(*args)
            except Exception as e:  # noqa: BLE001 - re-raised with the case named
                raise AssertionError(f"{kind} {op} (M={m}) does not lower for TPU: {e}") from e
            assert "tpu_custom_call" in exp.mlir_module(), f"{kind} {op} (M={m}): no Mosaic kernel in the module"
            want = (m, n) if op.startswith("forward") else (m, k)
            assert exp.out_avals[0].shape == want and exp.out_avals[0].dtype == bf, f"{kind} {op} (M={m})"


def test_tile_heuristic_follows_the_rules():
    assert tiles_for(5, 200, 384, "nf4", 64) == TpuTiles(16, 256, 384)  # all of K: one step
    assert tiles_for(512, 1024, 4096, "nf4", 64) == TpuTiles(256, 256, 512)
    assert tiles_for(1000, 64, 640, "nf4", 64) == TpuTiles(256, 128, 256)  # 256 pads 640 to 768, not 1024
    assert tiles_for(3, 4096, 640, "int8", 64).bk == 128


def test_bad_input_is_refused_by_name():
    _, q, _, _, _ = _inputs("nf4", 5, 200, 384)
    x = jnp.ones((5, 384))
    scales = kernel_scales(q)
    with pytest.raises(ValueError, match="codes of shape"):
        T.forward(x, q.codes[:, :-1], scales, n=200, interpret=True, **_kw(q))
    with pytest.raises(ValueError, match="unsupported quantization 'int3'"):
        T.forward(x, q.codes, scales, kind="int3", blocksize=64, n=200, interpret=True)
    with pytest.raises(ValueError, match="16-value code table"):
        T.transposed(jnp.ones((5, 200)), q.codes, scales, kind="nf4", blocksize=64, k=384, interpret=True)
    with pytest.raises(ValueError, match="scales of shape"):
        T.forward(x, q.codes, scales[:, :-1], n=200, interpret=True, **_kw(q))
    with pytest.raises(ValueError, match="tile bn=64"):
        T.forward(x, q.codes, scales, n=200, tiles=TpuTiles(16, 64, 256), interpret=True, **_kw(q))

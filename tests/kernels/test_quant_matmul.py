"""The fused quantized matmul kernels in Pallas' interpreter (how CI runs them): forward with the LoRA
epilogue, the split-K decode path and the transposed (input-gradient) kernel against XLA's
dequantize-then-matmul, on random inputs, shapes that are not tile multiples, poisoned outputs;
gradients of the custom VJP (over the GPU and the TPU kernel); dispatch by the platform lowered for; every
kind's Triton kernels lowered for CUDA; a QLoRA training step on either kernel equals the XLA path."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxtune.kernels import quant_matmul as K
from jaxtune.kernels.quant_matmul import Tiles
from jaxtune.quant import QuantConfig, quantize_kernel
from jaxtune.job.lowering import kernel_census
from jaxtune.kernels import tiles as K_TILES
from jaxtune.ops.linear import linear
from jaxtune.peft.lora import LoraWeight
from jaxtune.quant.matmul import (KERNEL_ROWS, code_table, kernel_scales, path, paths, quant_lora_matmul,
                                  quant_matmul)
from jaxtune.quant.weight import with_kernel
from jaxtune.utils.platform import lowering_for, traced_for

M, IN, OUT = 37, 192, 80  # none of them a multiple of the tiles below
TILES = Tiles(bm=16, bn=32, bk=32)
HIGHEST = jax.lax.Precision.HIGHEST


def _inputs(kind, rank=16, m=M, seed=0):
    keys = jax.random.split(jax.random.key(seed), 5)
    x = jax.random.normal(keys[0], (m, IN))
    w = jax.random.normal(keys[1], (IN, OUT)) * 0.05
    a = jax.random.normal(keys[2], (IN, rank)) * 0.1
    b = jax.random.normal(keys[3], (rank, OUT)) * 0.1
    q = quantize_kernel(w, QuantConfig(kind=kind, double_quant=kind in ("nf4", "fp4"), blocksize=64))
    return x, q, a, b, keys[4]


def _reference(x, q, a, b, s):
    """XLA: dequantize, then matmul, then the low-rank term (float32, HIGHEST precision)."""
    wt = q.dequantize_t(jnp.float32)
    return (jnp.matmul(x, wt.T, precision=HIGHEST)
            + s * jnp.matmul(jnp.matmul(x, a, precision=HIGHEST), b, precision=HIGHEST))


def _tolerance(dtype):
    return dict(rtol=1e-5, atol=1e-5) if dtype == jnp.float32 else dict(rtol=0.03, atol=0.03)


def _close(got, want, dtype, what=""):
    """float32: elementwise to 1e-5; bfloat16: relative error of the whole array under 1% (its
    rounding is ~0.4% per operand, and sums over rows amplify it for small entries)."""
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    if dtype == jnp.float32:
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=what)
    else:
        assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-2, what


CASES = [(kind, dtype, 16) for kind in ("nf4", "int8", "int4") for dtype in (jnp.float32, jnp.bfloat16)]
CASES += [("nf4", jnp.float32, 8), ("nf4", jnp.float32, 64), ("fp4", jnp.float32, 16)]


@pytest.mark.parametrize("kind,dtype,rank", CASES)
def test_forward_with_lora_epilogue_matches_xla(kind, dtype, rank):
    x, q, a, b, _ = _inputs(kind, rank)
    xa = jnp.matmul(x, a, precision=HIGHEST)
    out = K.forward(x.astype(dtype), q.codes, kernel_scales(q), kind=kind, table=code_table(kind), blocksize=64, n=OUT,
                    xa=xa.astype(dtype),
                    b=b.astype(dtype), lora_scale=2.0, tiles=TILES, out_dtype=dtype, interpret=True, poison=True)
    assert out.shape == (M, OUT) and out.dtype == dtype and not bool(jnp.isnan(out).any())
    ref = _reference(x, q, a, b, 2.0)
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref), **_tolerance(dtype))


@pytest.mark.parametrize("m", [1, 4, 16])
@pytest.mark.parametrize("kind,dtype", [("nf4", jnp.bfloat16), ("int8", jnp.float32)])
def test_split_k_decode_path_matches_xla(m, kind, dtype):
    x, q, a, b, _ = _inputs(kind, m=m, seed=m)
    xa = jnp.matmul(x, a, precision=HIGHEST)
    out = K.forward(x.astype(dtype), q.codes, kernel_scales(q), kind=kind, table=code_table(kind), blocksize=64, n=OUT,
                    xa=xa.astype(dtype),
                    b=b.astype(dtype), lora_scale=0.5, tiles=Tiles(bm=16, bn=32, bk=32, splits=3), out_dtype=dtype,
                    interpret=True, poison=True)
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(_reference(x, q, a, b, 0.5)),
                               **_tolerance(dtype))


@pytest.mark.parametrize("kind", ["nf4", "int8", "int4"])
def test_transposed_kernel_is_the_input_gradient(kind):
    _, q, _, _, key = _inputs(kind)
    dy = jax.random.normal(key, (M, OUT))
    dx = K.transposed(dy, q.codes, kernel_scales(q), kind=kind, table=code_table(kind), blocksize=64, k=IN, tiles=TILES,
                      interpret=True, poison=True)
    ref = jnp.matmul(dy, q.dequantize_t(jnp.float32), precision=HIGHEST)
    np.testing.assert_allclose(np.asarray(dx), np.asarray(ref), rtol=1e-5, atol=1e-5)


def test_poisoned_output_catches_an_unwritten_tile(monkeypatch):
    """The harness itself: a kernel that skips every tile but the first leaves NaN behind."""
    real = K._forward_kernel

    def lazy(*refs, **kw):
        @pl_when(jax.experimental.pallas.program_id(0) == 0)
        def _():
            real(*refs, **kw)

    pl_when = jax.experimental.pallas.when
    monkeypatch.setattr(K, "_forward_kernel", lazy)
    x, q, _, _, _ = _inputs("nf4")
    out = K.forward(x, q.codes, kernel_scales(q), kind="nf4", table=code_table("nf4"), blocksize=64, n=OUT, tiles=TILES,
                    interpret=True, poison=True)
    assert bool(jnp.isnan(out[TILES.bm:]).all()) and not bool(jnp.isnan(out[:TILES.bm]).any())


@pytest.mark.parametrize("kind,dtype,impl", [("nf4", jnp.float32, "interpret"), ("int4", jnp.float32, "interpret"),
                                             ("nf4", jnp.bfloat16, "interpret"), ("nf4", jnp.float32, "interpret_tpu"),
                                             ("int8", jnp.float32, "interpret_tpu")])
def test_custom_vjp_gradients_match_jax_grad_of_the_xla_reference(kind, dtype, impl):
    """The custom VJP over the GPU kernel (interpret) and over the TPU kernel (interpret_tpu)."""
    x, q, a, b, key = _inputs(kind, m=20)
    x = x.reshape(4, 5, IN)  # leading batch dimensions are flattened and restored
    weights = jax.random.normal(key, (4, 5, OUT))
    kernel_q = with_kernel(q, impl)
    name = jnp.dtype(dtype).name

    def fused(x, a, b):
        return jnp.sum(quant_lora_matmul(x, x, kernel_q, a, b, 2.0, name, impl).astype(jnp.float32) * weights)

    def reference(x, a, b):
        return jnp.sum(_reference(x.reshape(-1, IN), q, a, b, 2.0).reshape(4, 5, OUT) * weights)

    got = jax.grad(fused, argnums=(0, 1, 2))(x, a, b)
    want = jax.grad(reference, argnums=(0, 1, 2))(x, a, b)
    for g, r, name_ in zip(got, want, ("dx", "dA", "dB")):
        assert g.shape == r.shape, name_
        _close(g, r, dtype, name_)
    # without LoRA: the plain quantized product and its input gradient
    g = jax.grad(lambda x: jnp.sum(quant_matmul(x, kernel_q, name, impl).astype(jnp.float32) * weights))(x)
    r = jax.grad(lambda x: jnp.sum(jnp.matmul(x, q.dequantize(jnp.float32), precision=HIGHEST) * weights))(x)
    _close(g, r, dtype, "dx without LoRA")


def test_dispatch_follows_the_platform_and_refuses_what_cannot_run():
    _, q, _, _, _ = _inputs("nf4")
    assert jax.default_backend() == "cpu"
    assert path(q, 128) == "xla"  # auto, lowered for this CPU
    assert paths(q, 128) == {"cpu": "xla", "cuda": "pallas", "tpu": "tpu"}  # nobody measured this shape: rows rule
    assert paths(q, KERNEL_ROWS) == {"cpu": "xla", "cuda": "xla", "tpu": "xla"}
    assert path(with_kernel(q, "interpret"), 128) == "interpret"
    assert set(paths(with_kernel(q, "interpret_tpu"), 128).values()) == {"interpret_tpu"}
    with pytest.raises(ValueError, match="this program is for the CPU"):
        path(with_kernel(q, "pallas"), 128)
    with traced_for("tpu"):  # traced for an accelerator from this CPU: the platform's kernel
        assert path(with_kernel(q, "pallas"), 128) == "tpu"
    with traced_for("cuda"):
        assert path(with_kernel(q, "pallas"), 128) == "pallas"
    flat = quantize_kernel(jnp.ones((100, 48)), QuantConfig(kernel="interpret"))  # 100 inputs: flat layout
    with pytest.raises(ValueError, match="needs the 2-D layout"):
        path(flat, 4)
    assert set(paths(dataclasses.replace(flat, kernel="auto"), 4).values()) == {"xla"}
    with pytest.raises(ValueError, match="quant.kernel"):
        QuantConfig(kernel="cuda")


@pytest.mark.parametrize("kernel", ["auto", "pallas"])
def test_a_qlora_layer_lowered_for_each_platform_contains_that_platforms_kernel(kernel):
    """One program traced for cpu / cuda / tpu (`lowering_for`) and lowered for each holds XLA's
    product, the Triton kernels or the Mosaic kernels (forward and, in the gradient, transposed)."""
    x, q, a, b, _ = _inputs("nf4", m=32)
    q = with_kernel(q, kernel)
    lora = LoraWeight(base=q, a=a, b=b, scale=2.0, dropout=0.0)

    def loss(x, a, b):
        return jnp.sum(linear(x, dataclasses.replace(lora, a=a, b=b), dtype=jnp.bfloat16).astype(jnp.float32) ** 2)

    want = {"cpu": (), "cuda": ("triton:nf4_matmul", "triton:nf4_matmul_t"),
            "tpu": ("tpu_custom_call:nf4_matmul_tpu", "tpu_custom_call:nf4_matmul_t_tpu")}
    platforms = ("cuda", "tpu") if kernel == "pallas" else ("cpu", "cuda", "tpu")  # pallas: refused for a CPU program
    with lowering_for(*platforms):  # one trace, each platform's branch staged out
        traced = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(x, a, b)
    for platform in platforms:
        kernels = kernel_census(traced.lower(lowering_platforms=(platform,)).as_text())
        assert sorted(kernels) == sorted(want[platform]), (kernel, platform, kernels)
    if kernel == "auto":  # traced for this host only: XLA, no kernel staged out
        assert not kernel_census(jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(x, a, b).lower().as_text())


SPLIT_K = Tiles(bm=16, bn=64, bk=64, splits=4, num_stages=4)  # the decode path's shape of tiles


@pytest.mark.parametrize("kind", ["nf4", "fp4", "int4", "int8"])
def test_triton_kernels_lower_for_cuda(kind):
    """Forward (+ LoRA), split-K decode and transposed, at Llama-8B projection shapes, lowered to
    Triton custom calls (no GPU needed: lowering runs Pallas' Triton front end)."""
    k, n, r = 4096, 1024, 16
    q = quantize_kernel(jnp.zeros((k, n), jnp.bfloat16), QuantConfig(kind=kind, double_quant=kind in ("nf4", "fp4")))
    common = dict(kind=kind, blocksize=q.blocksize, table=code_table(kind))
    scales = kernel_scales(q)
    cases = {
        "forward+lora": (2048, lambda x, xa, b: K.forward(x, q.codes, scales, n=n, xa=xa, b=b,
                                                           tiles=K_TILES.choose(2048, n, k, kind, q.blocksize), **common)),
        "split-K decode": (1, lambda x, xa, b: K.forward(x, q.codes, scales, n=n, xa=xa, b=b, tiles=SPLIT_K, **common)),
        "transposed": (2048, lambda dy, xa, b: K.transposed(dy[:, :n], q.codes, scales, k=k, tiles=Tiles(), **common)),
    }
    for op, (m, fn) in cases.items():
        args = (jax.ShapeDtypeStruct((m, k), jnp.bfloat16), jax.ShapeDtypeStruct((m, r), jnp.bfloat16),
                jax.ShapeDtypeStruct((r, n), jnp.bfloat16))
        try:
            text = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
        except Exception as err:  # noqa: BLE001
            raise AssertionError(f"{kind} {op}: did not lower for cuda: {err}") from err
        assert any(name.startswith("triton:") for name in kernel_census(text)), f"{kind} {op}: no Triton call"


@pytest.mark.parametrize("kernel", ["interpret", "interpret_tpu"])
def test_qlora_training_step_on_the_kernel_path_equals_the_xla_path(kernel):
    from jaxtune.data.streams import SyntheticStream
    from jaxtune.models import Model, ModelConfig
    from jaxtune.parallel import MeshConfig, make_mesh
    from jaxtune.peft import LoraConfig, apply_lora, trainable_mask
    from jaxtune.quant import quantize
    from jaxtune.train.config import TrainConfig
    from jaxtune.train.loop import train
    from jaxtune.train.losses import causal_lm_loss
    from jaxtune.train.optim import OptimConfig, build_optimizer

    cfg = ModelConfig(family="llama", vocab_size=64, hidden_size=64, num_layers=1, num_heads=2, num_kv_heads=1,
                      head_dim=32, intermediate_size=128, max_position_embeddings=64)
    base = quantize(Model(cfg).init(jax.random.key(0)), QuantConfig())
    adapted = apply_lora(base, LoraConfig(rank=8, targets=("all-linear",), init="gaussian"), jax.random.key(1))
    adapted = jax.tree.map(lambda x: dataclasses.replace(x, b=0.05 * jnp.ones_like(x.b)) if hasattr(x, "a") else x,
                           adapted, is_leaf=lambda x: hasattr(x, "a"))
    results = {}
    for impl in ("xla", kernel):
        params = with_kernel(adapted, impl)
        optimizer, schedule = build_optimizer(OptimConfig(lr=1e-2, warmup_steps=1, schedule="constant"), 2)
        results[impl] = train(loss_fn=causal_lm_loss(Model(cfg)), params=params, model_cfg=cfg, optimizer=optimizer,
                                schedule=schedule, cfg=TrainConfig(steps=2, batch_size=2, seq_len=16, eval_batches=0),
                                batches=SyntheticStream(2, 16, cfg.vocab_size, seed=0), mesh=make_mesh(MeshConfig()),
                                trainable_mask=trainable_mask(params))
    losses = {k: [h["loss"] for h in r.history] for k, r in results.items()}
    np.testing.assert_allclose(losses[kernel], losses["xla"], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(results[kernel].state.params), jax.tree.leaves(results["xla"].state.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


def test_auto_on_a_gpu_follows_the_tile_table_then_the_row_rule(monkeypatch):
    from jaxtune.kernels import tiles

    _, q, _, _, _ = _inputs("nf4")
    kind = jax.devices()[0].device_kind
    monkeypatch.setattr(tiles, "_measured", lambda: {
        tiles.key(kind, "nf4", 4, OUT, IN): {"bm": 16, "bn": 64, "bk": 64, "splits": 2, "num_warps": 4, "num_stages": 4},
        tiles.key(kind, "nf4", 128, OUT, IN): "xla"})
    assert path(q, 3, "cuda") == "pallas"  # rows bucket to 4: measured, the kernel won
    assert tiles.choose(3, OUT, IN, "nf4", 64, kind).splits == 2
    assert path(q, 100, "cuda") == "xla"  # bucket 128: measured, XLA won
    assert path(q, 300, "cuda") == "pallas"  # never measured on this device kind: below KERNEL_ROWS
    assert path(q, KERNEL_ROWS, "cuda") == "xla"  # never measured, at training sizes: XLA
    assert tiles.choose(300, OUT, IN, "nf4", 64, kind) == Tiles(bm=128, bn=128, bk=64, num_warps=8)  # the heuristic

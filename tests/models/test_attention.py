"""Blockwise attention equals dense attention on every mask the model builds (values and gradients),
its memory grows linearly with the length, its backward transposes nothing of [queries, keys] size,
and `auto` / the Pallas kernels lower for the platform they are asked for."""

import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxtune.kernels.flash_attention import gpu_flash_attention, splash_attention, unsupported_by
from jaxtune.models import Model
from jaxtune.models.attention import attend
from jaxtune.models.blockwise import blockwise_attention
from jaxtune.models.masks import MaskInfo
from jaxtune.models.presets import preset
from jaxtune.train.losses import causal_lm_loss
from jaxtune.utils.platform import lowering_for
from tests.conftest import SUITE_XLA_FLAGS


def _qkv(batch, q_len, kv_len, heads=8, kv_heads=2, head_dim=16, seed=0):
    keys = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(keys[0], (batch, q_len, heads, head_dim))
    k = jax.random.normal(keys[1], (batch, kv_len, kv_heads, head_dim))
    v = jax.random.normal(keys[2], (batch, kv_len, kv_heads, head_dim))
    return q, k, v, jax.random.normal(keys[3], q.shape)


def _self(segments, **kw):
    seg = jnp.asarray(segments, jnp.int32)
    index = jnp.arange(seg.shape[1], dtype=jnp.int32)
    return MaskInfo(seg, seg, index, index, **kw)


PACKED = [[1] * 9 + [2] * 14 + [3] * 10 + [0] * 4, [1] * 37]
LEFT_PADDED = [[0] * 11 + [1] * 26, [0] * 3 + [1] * 34]
CASES = {
    "causal": (_self([[1] * 37, [1] * 37]), 37),
    "packed": (_self(PACKED), 37),
    "left_padding": (_self(LEFT_PADDED), 37),
    "sliding_window": (_self(PACKED, window=6), 37),
    "bidirectional": (_self(PACKED, causal=False), 37),
    "bidirectional_window": (_self(PACKED, causal=False, window=5), 37),
    "fully_padded_row": (_self([[0] * 37, [1] * 20 + [0] * 17]), 37),
}


def _with_prefix(window=None):
    seg = jnp.asarray(PACKED, jnp.int32)
    index = jnp.arange(37, dtype=jnp.int32)
    positions = 5 + jnp.asarray([list(range(9)) + list(range(14)) + list(range(10)) + [0] * 4, list(range(37))])
    return MaskInfo(seg, seg, index, index, q_positions=positions, window=window, num_prefix=5)


def _decode():
    """3 new queries against a cache of 40 slots, 20 written before, the first row left-padded."""
    k_seg = jnp.asarray([[0] * 4 + [1] * 19 + [0] * 17, [1] * 23 + [0] * 17], jnp.int32)
    return MaskInfo(jnp.ones((2, 3), jnp.int32), k_seg, 20 + jnp.arange(3, dtype=jnp.int32),
                    jnp.arange(40, dtype=jnp.int32), cached=True)


def _dense(q, k, v, mask):
    return attend(q, k, v, mask, "xla")


def _compare(mask, q_len, kv_len, block=(8, 16)):
    q, k, v, w = _qkv(2, q_len, kv_len)
    real = np.asarray(mask.q_segments) != 0  # a padding query's output is defined only by blockwise (zero)

    def loss(fn):
        return lambda q, k, v: jnp.sum(jnp.where(jnp.asarray(real)[..., None, None], fn(q, k, v, mask), 0.0) * w)

    blockwise = lambda q, k, v, m: blockwise_attention(q, k, v, m, block_q=block[0], block_kv=block[1])  # noqa: E731
    out, ref = jax.jit(blockwise)(q, k, v, mask), jax.jit(_dense)(q, k, v, mask)
    np.testing.assert_allclose(np.asarray(out)[real], np.asarray(ref)[real], rtol=1e-5, atol=1e-5)
    assert np.isfinite(np.asarray(out)).all()
    got = jax.jit(jax.grad(loss(blockwise), argnums=(0, 1, 2)))(q, k, v)
    want = jax.jit(jax.grad(loss(_dense), argnums=(0, 1, 2)))(q, k, v)
    for g, r, name in zip(got, want, "qkv"):
        assert np.isfinite(np.asarray(g)).all(), name
        scale = float(jnp.max(jnp.abs(r)))
        assert float(jnp.max(jnp.abs(g - r))) <= 1e-4 * scale, (name, float(jnp.max(jnp.abs(g - r))), scale)


@pytest.mark.parametrize("case", sorted(CASES))
def test_blockwise_equals_dense(case):
    mask, length = CASES[case]  # 37: no block size divides it
    _compare(mask, length, length)


@pytest.mark.parametrize("window", [None, 7])
def test_blockwise_equals_dense_with_prefix_columns(window):
    _compare(_with_prefix(window), 37, 42)


def test_blockwise_equals_dense_decoding_against_a_cache():
    _compare(_decode(), 3, 40)


def test_a_fully_padded_row_gives_zeros_and_no_nan():
    q, k, v, _ = _qkv(2, 37, 37)
    mask = CASES["fully_padded_row"][0]
    out = blockwise_attention(q, k, v, mask, block_q=8, block_kv=16)
    assert float(jnp.abs(out[0]).max()) == 0.0
    grads = jax.grad(lambda q: jnp.sum(blockwise_attention(q, k, v, mask, block_q=8, block_kv=16)))(q)
    assert np.isfinite(np.asarray(grads)).all() and float(jnp.abs(grads[0]).max()) == 0.0


def _backward_hlo(length, block):
    """The compiled forward + backward of one causal attention call (abstract inputs: nothing runs)."""
    q = jax.ShapeDtypeStruct((1, length, 8, 64), jnp.float32)
    k = jax.ShapeDtypeStruct((1, length, 2, 64), jnp.float32)
    mask = _self(np.ones((1, length), np.int32))
    fn = jax.jit(jax.grad(lambda q, k, v: jnp.sum(blockwise_attention(q, k, v, mask, block_q=block, block_kv=block)),
                          argnums=(0, 1, 2)))
    return fn.lower(q, k, k).compile()


def test_backward_transposes_nothing_of_query_by_key_size():
    """The cause of dense attention's slow CPU backward: copies of the probabilities to feed the
    dK / dV GEMMs. Blockwise lays the operands out so that no [.., block, block] array is moved."""
    length, block = 256, 128
    text = _backward_hlo(length, block).as_text()
    moved = [re.search(r"= \w+\[([\d,]*)\]\S* (copy|transpose)\(", line) for line in text.splitlines()]
    tiles = [m.group(0) for m in moved if m and len(m.group(1).split(",")) >= 2
             and all(int(d) >= block for d in m.group(1).split(",")[-2:])]
    assert not tiles, tiles


def test_memory_grows_linearly_with_length():
    """XLA's compiled memory analysis of one forward + backward (a memory figure, not a timing)."""
    temp = [_backward_hlo(n, 512).memory_analysis().temp_size_in_bytes for n in (2048, 8192, 32768)]
    assert temp[1] <= 4.5 * temp[0] and temp[2] <= 4.5 * temp[1], temp


def test_kernels_say_what_they_cannot_express():
    q, k, _, _ = _qkv(1, 8, 8)
    plain = _self([[1] * 8])
    assert unsupported_by("splash", q, k, plain) is None and unsupported_by("flash", q, k, plain) is None
    assert "prefix" in unsupported_by("splash", q, k, MaskInfo(plain.q_segments, plain.k_segments, plain.q_index,
                                                               plain.k_index, num_prefix=2))
    assert "KV cache" in unsupported_by("flash", q[:, :2], k, _decode())
    assert unsupported_by("flash", q, k, _self([[1] * 8], window=3)) == "a sliding window"
    assert unsupported_by("splash", q, k, _self([[1] * 8], window=3)) is None


@pytest.mark.parametrize("mask", [_self(PACKED[:1] + [[1] * 37]), _self(PACKED, causal=False)], ids=["causal", "bidirectional"])
def test_pallas_gpu_flash_attention_in_the_interpreter_equals_blockwise(mask):
    q, k, v, _ = _qkv(2, 37, 37, head_dim=16)
    real = np.asarray(mask.q_segments) != 0
    out = gpu_flash_attention(q, k, v, mask, interpret=True)
    ref = blockwise_attention(q, k, v, mask)
    np.testing.assert_allclose(np.asarray(out)[real], np.asarray(ref)[real], rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("kw", [{}, {"window": 16}, {"causal": False}], ids=["causal", "window", "bidirectional"])
def test_splash_attention_in_the_interpreter_equals_blockwise(kw):
    """TPU's kernel (Pallas interpreter, any backend): packed documents, GQA, a length its 128-blocks
    do not divide; values and gradients."""
    q, k, v, w = _qkv(1, 200, 200, heads=4, head_dim=64)
    mask = _self([[1] * 80 + [2] * 100 + [0] * 20], **kw)
    real = jnp.asarray(np.asarray(mask.q_segments) != 0)[..., None, None]
    out = splash_attention(q, k, v, mask, interpret=True, block=128)
    ref = blockwise_attention(q, k, v, mask)
    np.testing.assert_allclose(np.asarray(out * real), np.asarray(ref * real), rtol=1e-5, atol=1e-5)
    grads = [jax.grad(lambda q, k, v: jnp.sum(f(q, k, v) * real * w), argnums=(0, 1, 2))(q, k, v)
             for f in (lambda *a: splash_attention(*a, mask, interpret=True, block=128),
                       lambda *a: blockwise_attention(*a, mask))]
    for g, r in zip(*grads):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-4, atol=1e-4 * float(jnp.abs(r).max()))


def test_cudnn_falls_back_to_blockwise_with_one_warning_where_it_cannot_run(monkeypatch, caplog):
    """JAX looks for cuDNN when tracing: on this CPU the call falls back, saying so once."""
    from jaxtune.models import attention

    monkeypatch.setattr(attention, "_warned", set())
    q, k, v, _ = _qkv(2, 37, 37)
    mask = CASES["packed"][0]
    real = np.asarray(mask.q_segments) != 0
    with caplog.at_level("WARNING", logger="jaxtune.models.attention"):
        out = attend(q, k, v, mask, "cudnn")
        attend(q, k, v, mask, "cudnn")
    assert len([r for r in caplog.records if "attention_impl=cudnn does not apply" in r.message]) == 1
    np.testing.assert_allclose(np.asarray(out)[real], np.asarray(_dense(q, k, v, mask))[real], rtol=1e-5, atol=1e-5)


def _train_step_text(cfg, platform):
    params = jax.eval_shape(Model(cfg).init, jax.random.key(0))
    rows = {k: jax.ShapeDtypeStruct((2, 256), jnp.int32) for k in ("tokens", "targets", "segment_ids", "positions")}
    rows["loss_mask"] = jax.ShapeDtypeStruct((2, 256), jnp.float32)
    loss = causal_lm_loss(Model(cfg))
    step = jax.jit(jax.value_and_grad(lambda p, b: loss(p, b, None)[0]))
    with lowering_for("cpu", "cuda", "tpu"):  # one trace, every platform's branch staged out
        traced = step.trace(params, rows)
    return traced.lower(lowering_platforms=(platform,)).as_text()


@pytest.mark.parametrize("impl", ["auto", "splash", "flash"])
def test_a_training_step_lowers_to_the_accelerators_kernels(impl):
    """Lowered (not compiled) for TPU and CUDA from this CPU: auto follows the platform being
    lowered for (traced for all three, lowered for each). cuDNN cannot be lowered without a GPU (JAX looks for it when tracing)."""
    cfg = preset("tiny-llama").replace(num_layers=1, attention_impl=impl)
    platforms = {"auto": ("tpu", "cuda"), "splash": ("tpu",), "flash": ("cuda",)}[impl]
    for platform in platforms:
        text = _train_step_text(cfg, platform)
        if platform == "tpu":
            assert "tpu_custom_call" in text, platform
        else:
            assert re.search(r"triton", text, re.IGNORECASE), platform
    if impl == "auto":
        assert "tpu_custom_call" not in _train_step_text(cfg, "cpu")


SHARDED_LOWERING = """
import re, jax, jax.numpy as jnp
from jaxtune.models import Model
from jaxtune.models.presets import preset
from jaxtune.parallel import MeshConfig, make_mesh
from jaxtune.parallel.rules import activation_mesh
from jaxtune.train.losses import causal_lm_loss
from jaxtune.utils.platform import lowering_for
cfg = preset("tiny-llama").replace(num_layers=1)
params = jax.eval_shape(Model(cfg).init, jax.random.key(0))
rows = {k: jax.ShapeDtypeStruct((8, 256), jnp.int32) for k in ("tokens", "targets", "segment_ids", "positions")}
rows["loss_mask"] = jax.ShapeDtypeStruct((8, 256), jnp.float32)
mesh, loss = make_mesh(MeshConfig(2, 2, 2)), causal_lm_loss(Model(cfg))
def f(p, b):
    with activation_mesh(mesh):
        return loss(p, b, None)[0]
for platform, call in (("tpu", "tpu_custom_call"), ("cuda", "triton")):
    with lowering_for(platform):
        text = jax.jit(jax.value_and_grad(f)).trace(params, rows).lower(lowering_platforms=(platform,)).as_text()
    print(platform, call.lower() in text.lower(), "manual" in text.lower())
"""


@pytest.mark.parametrize("length", [8, 37, 100, 200])
def test_gpu_flash_attention_lowers_for_cuda_at_any_length(length):
    """Triton needs power-of-two tiles: short sequences are padded to one (values and gradients)."""
    q, k, v, w = _qkv(2, length, length, head_dim=64)
    mask = _self(np.ones((2, length), np.int32))
    grad = jax.jit(jax.grad(lambda q, k, v: jnp.sum(gpu_flash_attention(q, k, v, mask) * w), argnums=(0, 1, 2)))
    text = grad.trace(q, k, v).lower(lowering_platforms=("cuda",)).as_text()
    assert re.search("triton", text, re.IGNORECASE)


def test_kernels_run_per_device_under_a_mesh():
    """On a (2, 2, 2) mesh of 8 CPU devices (a subprocess), the kernels are lowered inside shard_map
    (manual sharding: each device's batch and heads), not on gathered activations."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2]), "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": f"--xla_force_host_platform_device_count=8 {SUITE_XLA_FLAGS}"}
    proc = subprocess.run([sys.executable, "-c", SHARDED_LOWERING], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["tpu", "True", "True", "cuda", "True", "True"], proc.stdout

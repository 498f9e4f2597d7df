"""FLOPs accounting, peak-FLOP/s lookup and the metrics logger (JSONL, TensorBoard, progress bar)."""

import glob
import json
import math
import os
import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tensorboardX.proto import event_pb2
from tensorboardX.record_writer import masked_crc32c

from jaxtune.models import Model, ModelConfig
from jaxtune.train import metrics
from jaxtune.train.metrics import MetricsLogger, device_peak_flops, mfu, model_flops_per_token

LLAMA_LIKE = ModelConfig(
    family="llama", vocab_size=1000, hidden_size=64, num_layers=3, num_heads=8, num_kv_heads=2,
    head_dim=16, intermediate_size=176, mlp="gated", tie_word_embeddings=False,
)
GPT2_LIKE = ModelConfig(
    family="gpt2", vocab_size=500, hidden_size=48, num_layers=2, num_heads=4, num_kv_heads=4, head_dim=12,
    intermediate_size=192, norm="layernorm", mlp="plain", activation="gelu_tanh", position="learned",
    qkv_bias=True, o_bias=True, mlp_bias=True, tie_word_embeddings=True,
)


def test_flops_per_token_llama_like():
    # hidden 64, 8 query heads and 2 kv heads of 16, gated MLP 64 -> 176 -> 64, untied head to 1000.
    q_proj = 64 * (8 * 16)
    k_proj = v_proj = 64 * (2 * 16)
    o_proj = (8 * 16) * 64
    gate_up_down = 3 * 64 * 176
    lm_head = 64 * 1000
    n_matmul = 3 * (q_proj + k_proj + v_proj + o_proj + gate_up_down) + lm_head
    assert n_matmul == 226_816
    attention = 12 * 3 * 8 * 16 * 256
    assert model_flops_per_token(LLAMA_LIKE, seq_len=256) == 6 * n_matmul + attention == 2_540_544


def test_flops_per_token_gpt2_like_tied_head_still_counts():
    # hidden 48, 4 heads of 12 (q = k = v = 48 wide), plain MLP 48 -> 192 -> 48, tied head to 500.
    qkv = 3 * 48 * 48
    o_proj = 48 * 48
    up_down = 2 * 48 * 192
    lm_head = 48 * 500  # the tied embedding, used as the output projection
    n_matmul = 2 * (qkv + o_proj + up_down) + lm_head
    assert n_matmul == 79_296
    attention = 12 * 2 * 4 * 12 * 128
    assert model_flops_per_token(GPT2_LIKE, seq_len=128) == 6 * n_matmul + attention == 623_232


@pytest.mark.parametrize("cfg", [LLAMA_LIKE, GPT2_LIKE], ids=["llama", "gpt2"])
def test_matmul_parameters_are_the_models_kernels(cfg):
    """N_matmul equals the kernels the model really has (plus the embedding when it is the head)."""
    shapes = jax.eval_shape(Model(cfg).init, jax.random.key(0))
    kernels = 0
    for path, leaf in jax.tree_util.tree_leaves_with_path(shapes):
        name = jax.tree_util.keystr(path)
        if name.endswith("['kernel']") or (cfg.tie_word_embeddings and name == "['embed']['embedding']"):
            kernels += int(np.prod(leaf.shape))
    seq = 64
    attention = 12 * cfg.num_layers * cfg.num_heads * cfg.head_dim * seq
    assert (model_flops_per_token(cfg, seq) - attention) / 6 == kernels


@pytest.mark.parametrize(
    "kind, dtype, expected",
    [
        ("NVIDIA H100 80GB HBM3", "bfloat16", 989e12),
        ("NVIDIA H100 80GB HBM3", "float32", 494.5e12),  # TF32 dense
        ("NVIDIA H100 PCIe", "bfloat16", 756.5e12),
        ("NVIDIA H100 NVL", "float16", 835.5e12),
        ("NVIDIA H200", "bfloat16", 989e12),
        ("NVIDIA A100-SXM4-80GB", "bfloat16", 312e12),
        ("NVIDIA A100 80GB PCIe", "float32", 156e12),
        ("NVIDIA L4", "bfloat16", 121e12),
        ("Tesla V100-SXM2-16GB", "float16", 125e12),
        ("Tesla V100-PCIE-32GB", "float16", 112e12),
        ("NVIDIA GeForce RTX 4090", "bfloat16", 165.2e12),
        ("TPU v4", "bfloat16", 275e12),
        ("TPU v5 lite", "bfloat16", 197e12),
        ("TPU v5p", "bfloat16", 459e12),
        ("TPU v5", "bfloat16", 459e12),
        ("TPU v6 lite", "bfloat16", 918e12),
        ("TPU v6 lite", "float32", 918e12),  # float32 matmuls run on the bf16 MXU
    ],
)
def test_device_peak_flops_known_kinds(kind, dtype, expected):
    assert device_peak_flops(kind, dtype) == pytest.approx(expected)


def test_device_peak_flops_accepts_dtype_objects():
    assert device_peak_flops("NVIDIA H100 80GB HBM3", jnp.bfloat16) == pytest.approx(989e12)
    assert device_peak_flops("TPU v4", LLAMA_LIKE.compute_dtype) == pytest.approx(275e12)


@pytest.mark.parametrize("kind", ["cpu", "NVIDIA L40S", "NVIDIA GeForce RTX 4090 D", "TPU v3", "Apple M2"])
def test_device_peak_flops_unknown_kind_is_none(kind):
    assert device_peak_flops(kind, "bfloat16") is None


def test_device_peak_flops_unknown_dtype_is_none_and_override_wins():
    assert device_peak_flops("NVIDIA H100 80GB HBM3", "int8") is None
    assert device_peak_flops("cpu", "float32", override=1.5e12) == 1.5e12
    assert device_peak_flops("NVIDIA H100 80GB HBM3", "bfloat16", override=7e14) == 7e14


def test_mfu():
    # 1000 tokens/s x 6 GFLOP/token = 6 TFLOP/s on a 10 TFLOP/s device.
    assert mfu(1000.0, 6e9, 10e12) == pytest.approx(0.6)


def _strict_json(line):
    def reject(constant):
        raise ValueError(f"non-standard JSON constant {constant}")

    return json.loads(line, parse_constant=reject)


def _read_jsonl(log_dir):
    with open(os.path.join(log_dir, "metrics.jsonl"), encoding="utf-8") as f:
        return [_strict_json(line) for line in f]


def _read_scalars(log_dir):
    """(tag, step, value) of every scalar in the TensorBoard event files, framing checked by hand."""
    scalars = []
    for path in sorted(glob.glob(os.path.join(log_dir, "events.out.tfevents.*"))):
        with open(path, "rb") as f:
            data = f.read()
        pos = 0
        while pos < len(data):
            header = data[pos:pos + 8]
            (length,) = struct.unpack("<Q", header)
            (length_crc,) = struct.unpack("<I", data[pos + 8:pos + 12])
            assert length_crc == masked_crc32c(header)
            payload = data[pos + 12:pos + 12 + length]
            (payload_crc,) = struct.unpack("<I", data[pos + 12 + length:pos + 16 + length])
            assert len(payload) == length and payload_crc == masked_crc32c(payload)
            pos += 16 + length
            event = event_pb2.Event()
            event.ParseFromString(payload)
            for value in event.summary.value:
                number = value.simple_value if value.HasField("simple_value") else value.tensor.float_val[0]
                scalars.append((value.tag, event.step, number))
        assert pos == len(data)
    return scalars


def test_jsonl_lines_values_nan_and_append(tmp_path):
    log_dir = str(tmp_path / "run")
    with MetricsLogger(log_dir, total_steps=10, progress=False) as logger:
        logger.log(1, {"loss": 2.5, "lr": 1e-3, "tokens": 4096})
        logger.log(2, {"loss": float("nan"), "grad_norm": float("inf"), "delta": float("-inf")})
        logger.log(2, {"loss": np.float32(1.25)}, prefix="eval")

    lines = _read_jsonl(log_dir)
    assert [line["step"] for line in lines] == [1, 2, 2]
    assert all(isinstance(line["time"], float) for line in lines)
    assert lines[0]["train/loss"] == 2.5 and lines[0]["train/lr"] == 1e-3 and lines[0]["train/tokens"] == 4096
    assert lines[1]["train/loss"] == "nan"
    assert lines[1]["train/grad_norm"] == "inf" and lines[1]["train/delta"] == "-inf"
    assert lines[2] == {"step": 2, "time": lines[2]["time"], "eval/loss": 1.25}

    with MetricsLogger(log_dir, total_steps=10, start_step=2, progress=False) as resumed:
        resumed.log(3, {"loss": 2.0})
    lines = _read_jsonl(log_dir)
    assert [line["step"] for line in lines] == [1, 2, 2, 3]
    assert lines[3]["train/loss"] == 2.0


def test_tensorboard_scalars(tmp_path):
    log_dir = str(tmp_path / "run")
    with MetricsLogger(log_dir, total_steps=10, jsonl=False, progress=False) as logger:
        logger.log(1, {"loss": 3.0, "lr": 0.5})
        logger.log(2, {"loss": 2.0, "lr": 0.25})
        logger.log(2, {"loss": float("nan")}, prefix="eval")
    assert not os.path.exists(os.path.join(log_dir, "metrics.jsonl"))

    scalars = _read_scalars(log_dir)
    finite = [(tag, step, value) for tag, step, value in scalars if not math.isnan(value)]
    assert sorted(finite) == [
        ("train/loss", 1, 3.0), ("train/loss", 2, 2.0), ("train/lr", 1, 0.5), ("train/lr", 2, 0.25),
    ]
    nans = [(tag, step) for tag, step, value in scalars if math.isnan(value)]
    assert nans == [("eval/loss", 2)]


def test_progress_bar_postfix_and_position(capsys):
    with MetricsLogger(None, total_steps=10) as logger:
        logger.log(3, {"loss": 2.5, "lr": 1e-3, "tokens_per_s": 12345.6, "step_time_s": 0.25, "other": 1.0})
        logger.log(4, {"loss": 9.0}, prefix="eval")  # advances the bar; the postfix stays train's
    err = capsys.readouterr().err
    last = err.replace("\r", "\n").strip().splitlines()[-1]
    assert "4/10" in last
    assert "loss=2.5000" in last and "lr=1.00e-03" in last and "tok/s=12,346" in last and "step=0.250s" in last
    assert "other" not in last and "loss=9" not in last  # (the rate field may hold any digits)


def test_progress_bar_of_a_preference_run_counts_pairs_and_shows_accuracy_and_margin(capsys):
    with MetricsLogger(None, total_steps=10) as logger:
        logger.log(2, {"loss": 0.6, "reward_accuracy": 0.75, "reward_margin": 0.125, "pairs_per_s": 42.25})
    last = capsys.readouterr().err.replace("\r", "\n").strip().splitlines()[-1]
    assert "acc=0.750" in last and "margin=0.125" in last and "pairs/s=42.2" in last and "tok/s" not in last


def test_progress_disabled_and_no_log_dir_writes_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with MetricsLogger(None, total_steps=5, progress=False) as logger:
        logger.log(1, {"loss": 1.0})
    assert capsys.readouterr().err == ""
    assert os.listdir(tmp_path) == []


def test_only_process_zero_logs(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(metrics.jax, "process_index", lambda: 1)
    log_dir = tmp_path / "run"
    with MetricsLogger(str(log_dir), total_steps=5) as logger:
        logger.log(1, {"loss": 1.0})
    assert not log_dir.exists()
    assert capsys.readouterr().err == ""


def test_batch_examples_counts_pairs_rows_and_packed_documents_with_a_target():
    from jaxtune.train.metrics import batch_examples

    assert batch_examples({"pair_mask": np.array([1, 1, 0]), "segment_ids": np.ones((6, 4))}) == 2
    assert batch_examples({"row_mask": np.array([1.0, 0.0, 1.0, 1.0])}) == 3
    segments = np.array([[1, 1, 2, 2, 3, 0], [1, 1, 1, 1, 0, 0]])
    loss_mask = np.array([[0, 1, 0, 0, 1, 0], [1, 1, 1, 0, 0, 0]])  # document 2 of row 0 has no target
    assert batch_examples({"segment_ids": segments, "loss_mask": loss_mask}) == 3
    assert batch_examples({"segment_ids": segments}) == 4

"""Training throughput accounting (model FLOPs, peak FLOP/s, MFU) and metric logging.

`model_flops_per_token` and `device_peak_flops` give the two halves of model FLOPs utilization;
`MetricsLogger` writes scalars to ``metrics.jsonl``, TensorBoard, a tqdm bar and optionally Weights &
Biases (with the run's config; `jaxtune.train.wandb_sink`), on process 0 only,
and closing it never blocks exit for longer than its ``close_timeout_s``.
This module only reports numbers it is handed: it must not compute losses, touch parameters,
or block on device work by itself (the caller chooses when a metric is fetched from the device).
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
import threading
import time
import warnings
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from jaxtune.models.config import ModelConfig
from jaxtune.train.config import WandbConfig
from jaxtune.train.wandb_sink import WandbSink

_T = 1e12

# Dense (no structured sparsity) peak FLOP/s of one JAX device, by matmul input dtype.
# NVIDIA datasheets quote tensor-core figures "with sparsity"; the numbers here are half of those.
# NVIDIA "float32" is the TF32 tensor-core dense figure: XLA runs float32 matmuls as TF32 unless
# jax_default_matmul_precision is "highest", in which case true fp32 is far slower and MFU reads high.
# TPU "float32" and "float16" use the bf16 figure: the MXU multiplies bf16, and float32 matmuls at
# default precision are one bf16 pass ("highest" takes several, so MFU reads high there too).
PEAK_FLOPS: dict[str, dict[str, float]] = {
    # H100 datasheet (SXM5 / PCIe / NVL): BF16 1979 / 1513 / 1671 sparse, TF32 989 / 756 / 835 sparse.
    "H100 SXM": {"bfloat16": 989 * _T, "float16": 989 * _T, "float32": 494.5 * _T},
    "H100 PCIe": {"bfloat16": 756.5 * _T, "float16": 756.5 * _T, "float32": 378 * _T},
    "H100 NVL": {"bfloat16": 835.5 * _T, "float16": 835.5 * _T, "float32": 417.5 * _T},
    # H200 datasheet: same tensor cores and clocks as H100 SXM; the NVL card as H100 NVL.
    "H200": {"bfloat16": 989 * _T, "float16": 989 * _T, "float32": 494.5 * _T},
    "H200 NVL": {"bfloat16": 835.5 * _T, "float16": 835.5 * _T, "float32": 417.5 * _T},
    # A100 datasheet (SXM4 and PCIe, 40 and 80 GB alike): BF16 312, TF32 156 dense.
    "A100": {"bfloat16": 312 * _T, "float16": 312 * _T, "float32": 156 * _T},
    # L4 datasheet: BF16 242, TF32 120 sparse.
    "L4": {"bfloat16": 121 * _T, "float16": 121 * _T, "float32": 60 * _T},
    # V100 datasheet (SXM2 / PCIe / V100S): FP16 tensor 125 / 112 / 130; FP32 15.7 / 14 / 16.4.
    # Volta has no bf16 tensor cores or TF32: XLA runs bfloat16 and float32 matmuls at the fp32 rate.
    "V100 SXM2": {"bfloat16": 15.7 * _T, "float16": 125 * _T, "float32": 15.7 * _T},
    "V100 PCIe": {"bfloat16": 14 * _T, "float16": 112 * _T, "float32": 14 * _T},
    "V100S": {"bfloat16": 16.4 * _T, "float16": 130 * _T, "float32": 16.4 * _T},
    # Ada whitepaper, RTX 4090: BF16/FP16 with FP32 accumulate 165.2, TF32 82.6 dense.
    "RTX 4090": {"bfloat16": 165.2 * _T, "float16": 165.2 * _T, "float32": 82.6 * _T},
    # Cloud TPU docs, bf16 per chip; on v4, v5e, v5p and v6e one JAX device is one chip.
    "TPU v4": {"bfloat16": 275 * _T, "float16": 275 * _T, "float32": 275 * _T},
    "TPU v5e": {"bfloat16": 197 * _T, "float16": 197 * _T, "float32": 197 * _T},
    "TPU v5p": {"bfloat16": 459 * _T, "float16": 459 * _T, "float32": 459 * _T},
    "TPU v6e": {"bfloat16": 918 * _T, "float16": 918 * _T, "float32": 918 * _T},
}

# `jax.Device.device_kind` -> PEAK_FLOPS key; first match wins, so variants come before the base name.
_DEVICE_KINDS: tuple[tuple[str, str], ...] = (
    (r"H100.*NVL", "H100 NVL"),
    (r"H100.*PCIe", "H100 PCIe"),
    (r"H100", "H100 SXM"),  # "NVIDIA H100 80GB HBM3"
    (r"H200.*NVL", "H200 NVL"),
    (r"H200", "H200"),
    (r"\bA100\b", "A100"),  # "NVIDIA A100-SXM4-80GB", "NVIDIA A100 80GB PCIe"
    (r"\bL4\b", "L4"),  # not L40 / L40S
    (r"V100S", "V100S"),
    (r"V100.*PCIe", "V100 PCIe"),  # "Tesla V100-PCIE-32GB"
    (r"V100", "V100 SXM2"),
    (r"RTX 4090$", "RTX 4090"),  # not the cut-down "RTX 4090 D"
    (r"^TPU v4$", "TPU v4"),
    (r"^TPU v5( lite|e)$", "TPU v5e"),
    (r"^TPU v5p?$", "TPU v5p"),  # jax has reported v5p as both "TPU v5" and "TPU v5p"
    (r"^TPU v6( lite|e)$", "TPU v6e"),
)


def device_peak_flops(device_kind: str, dtype: Any, override: float | None = None) -> float | None:
    """Dense peak FLOP/s of one device of `device_kind` (as `jax.Device.device_kind` spells it)
    for matmuls in `dtype`; `override` wins when given. None for unknown kinds (CPU) and dtypes."""
    if override is not None:
        return float(override)
    for pattern, name in _DEVICE_KINDS:
        if re.search(pattern, device_kind, re.IGNORECASE):
            return PEAK_FLOPS[name].get(jnp.dtype(dtype).name)
    return None


def model_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training (forward + backward) FLOPs per token: 6 * N_matmul + attention.

    N_matmul counts the parameters that multiply activations: every projection kernel of every
    layer (q, k, v, o; gate, up, down) and the LM head, which does its matmul even when tied to
    the embedding. The embedding lookup, norms and biases are not counted. Attention is
    12 * layers * heads * head_dim * seq_len: forward and backward of QK^T and AV over the full
    seq_len x seq_len score matrix, with no halving for the causal mask and no shortening for
    sliding windows (PaLM, appendix B). For LoRA-style training on a frozen base this overstates
    the work, since frozen kernels get no weight gradient; the convention is kept for comparability.
    """
    q_features = cfg.num_heads * cfg.head_dim
    kv_features = cfg.num_kv_heads * cfg.head_dim
    attention = cfg.hidden_size * (q_features + 2 * kv_features) + q_features * cfg.hidden_size
    mlp = (3 if cfg.mlp == "gated" else 2) * cfg.hidden_size * cfg.intermediate_size
    n_matmul = cfg.num_layers * (attention + mlp) + cfg.hidden_size * cfg.vocab_size
    return 6.0 * n_matmul + 12.0 * cfg.num_layers * cfg.num_heads * cfg.head_dim * seq_len


def mfu(tokens_per_second_per_device: float, flops_per_token: float, peak: float) -> float:
    """Model FLOPs utilization: achieved model FLOP/s of one device over its peak (0..1)."""
    return tokens_per_second_per_device * flops_per_token / peak


def batch_examples(batch: dict) -> int:
    """The examples a host batch holds: real pairs (``pair_mask``), real rows (``row_mask``), else
    the documents with a loss-bearing token (one per row and segment id: packed rows hold several).
    Counted on this process's rows."""
    if "pair_mask" in batch:
        return int(np.sum(np.asarray(batch["pair_mask"]) > 0))
    if "row_mask" in batch:
        return int(np.sum(np.asarray(batch["row_mask"]) > 0))
    segments = np.asarray(batch["segment_ids"])
    if "loss_mask" in batch:
        segments = np.where(np.asarray(batch["loss_mask"]) > 0, segments, 0)
    return sum(len(np.unique(row[row > 0])) for row in segments.reshape(-1, segments.shape[-1]))


def _number(value: Any) -> int | float:
    """A Python int or float from a Python, numpy or (fetched) JAX scalar."""
    value = value.item() if hasattr(value, "item") else value
    return value if isinstance(value, int) else float(value)


def _json_safe(value: int | float) -> int | float | str:
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    return value


def _postfix(values: dict[str, int | float]) -> str:
    shown = []
    if "loss" in values:
        shown.append(f"loss={values['loss']:.4f}")
    if "lr" in values:
        shown.append(f"lr={values['lr']:.2e}")
    for name in ("reward_accuracy", "accuracy", "nsp_accuracy"):
        if name in values:
            shown.append(f"acc={values[name]:.3f}")
            break
    for name in ("reward_margin", "margin"):
        if name in values:
            shown.append(f"margin={values[name]:.3f}")
            break
    for name, value in values.items():
        if name.endswith("_per_s"):
            unit = name[: -len("_per_s")]
            shown.append(f"{'tok' if unit == 'tokens' else unit}/s={value:,.{0 if value >= 100 else 1}f}")
    if "step_time_s" in values:
        shown.append(f"step={values['step_time_s']:.3f}s")
    return ", ".join(shown)


class TensorBoardWriter:
    """Scalars to a TensorBoard event file in `log_dir`, written and flushed by the calling thread.

    tensorboardX's SummaryWriter hands each event to a writer thread through a multiprocessing
    queue, and its close() joins that thread (and interpreter exit joins the queue's feeder thread):
    a KeyboardInterrupt landing inside the queue's put() can leave it locked, and closing then waits
    for ever (issue 22). This writer has no thread and no queue; it uses tensorboardX's record
    format (the same ``events.out.tfevents.*`` files), one record per scalar.
    """

    def __init__(self, log_dir: str):
        from tensorboardX.event_file_writer import EventsWriter  # only when TensorBoard output is asked for
        from tensorboardX.proto.event_pb2 import Event
        from tensorboardX.summary import scalar

        self._event, self._scalar = Event, scalar
        self._file = EventsWriter(os.path.join(log_dir, "events"))

    def add_scalar(self, tag: str, value: int | float, step: int) -> None:
        self._file.write_event(self._event(wall_time=time.time(), step=int(step), summary=self._scalar(tag, value)))

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        self._file.close()


CLOSE_TIMEOUT_S = 5.0  # MetricsLogger.close waits this long for its sinks, all together


def close_within(closers: dict[str, Callable[[], None]], timeout_s: float) -> None:
    """Run each ``closers[name]()`` in its own daemon thread and wait for them all up to `timeout_s`
    seconds in total. A closer still running then is left behind (a daemon thread never holds up
    exit) with a RuntimeWarning naming it; one that raised is reported the same way: closing
    must not turn a finished or interrupted run into a crash or a hang."""
    outcome: dict[str, BaseException] = {}

    def run(name: str, close: Callable[[], None]) -> None:
        try:
            close()
        except BaseException as err:  # reported by the waiting thread
            outcome[name] = err

    threads = {name: threading.Thread(target=run, args=(name, close), name=f"jaxtune-close-{name}", daemon=True)
               for name, close in closers.items()}
    for thread in threads.values():
        thread.start()
    deadline = time.monotonic() + timeout_s
    for name, thread in threads.items():
        thread.join(max(deadline - time.monotonic(), 0.0))
        if thread.is_alive():
            warnings.warn(f"closing the {name} did not finish within {timeout_s:g} s; left behind (its "
                          "last records may be missing)", RuntimeWarning, stacklevel=3)
        elif name in outcome:
            warnings.warn(f"closing the {name} failed: {outcome[name]!r}", RuntimeWarning, stacklevel=3)


class MetricsLogger:
    """Scalar metrics to ``{log_dir}/metrics.jsonl``, TensorBoard and a progress bar.

    Only process 0 logs; other processes get a logger that does nothing. With `log_dir` None only
    the bar is shown. Files are opened for appending, so a resumed run continues the same logs.
    Each `log` call writes one JSON line ``{"step", "time", "<prefix>/<name>": value, ...}`` with
    NaN and infinities as the strings "nan", "inf", "-inf". The bar's postfix shows loss, lr,
    accuracy and margin (classification, preference objectives), throughput in the loss's unit
    (tokens/s, pairs/s, ...) and step time from "train" metrics; every call advances the bar to `step`.
    `close` gives the sinks `close_timeout_s` seconds in all, then moves on (see `close_within`).
    """

    def __init__(
        self,
        log_dir: str | None,
        *,
        total_steps: int,
        tensorboard: bool = True,
        jsonl: bool = True,
        progress: bool = True,
        start_step: int = 0,
        close_timeout_s: float = CLOSE_TIMEOUT_S,
        wandb: Optional[WandbConfig] = None,
        run_config: Optional[dict[str, Any]] = None,
    ):
        self._active = jax.process_index() == 0
        self._close_timeout_s = close_timeout_s
        self._jsonl = None
        self._tensorboard = None
        self._bar = None
        self._wandb = None
        if not self._active:
            return
        if wandb is not None:
            self._wandb = WandbSink(wandb, log_dir, run_config)
        if log_dir is not None and (jsonl or tensorboard):
            os.makedirs(log_dir, exist_ok=True)
            if jsonl:
                self._jsonl = open(os.path.join(log_dir, "metrics.jsonl"), "a", encoding="utf-8")
            if tensorboard:
                self._tensorboard = TensorBoardWriter(log_dir)
        if progress:
            self._bar = tqdm.tqdm(
                total=total_steps, initial=start_step, file=sys.stderr, unit="step", dynamic_ncols=True
            )

    def log(self, step: int, metrics: dict[str, float], prefix: str = "train") -> None:
        """Record `metrics` at `step` under tags "<prefix>/<name>" (just "<name>" if prefix is "")."""
        if not self._active:
            return
        values = {name: _number(value) for name, value in metrics.items()}
        tagged = {(f"{prefix}/{name}" if prefix else name): value for name, value in values.items()}
        if self._jsonl is not None:
            record = {"step": int(step), "time": time.time()}
            record.update({tag: _json_safe(value) for tag, value in tagged.items()})
            self._jsonl.write(json.dumps(record, allow_nan=False) + "\n")
            self._jsonl.flush()
        if self._tensorboard is not None:
            for tag, value in tagged.items():
                self._tensorboard.add_scalar(tag, value, int(step))
            self._tensorboard.flush()
        if self._wandb is not None:
            self._wandb.log(step, tagged)
        if self._bar is not None:
            if prefix == "train":
                self._bar.set_postfix_str(_postfix(values), refresh=False)
            if step > self._bar.n:
                self._bar.update(step - self._bar.n)
            else:
                self._bar.refresh()

    def close(self) -> None:
        """Flush and close every sink, waiting at most `close_timeout_s` seconds in all; safe to call
        twice (a sink is forgotten before it is closed, so a stuck one is never waited for again)."""
        sinks = {"metrics.jsonl": self._jsonl, "TensorBoard events": self._tensorboard, "progress bar": self._bar,
                 "W&B run": self._wandb}
        self._jsonl = self._tensorboard = self._bar = self._wandb = None
        closers = {name: sink.close for name, sink in sinks.items() if sink is not None}
        if closers:
            close_within(closers, self._close_timeout_s)

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

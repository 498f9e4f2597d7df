"""Every accelerator figure of the project in one run on one NVIDIA GPU (H100 / H200), within a time budget.

    PYTHONPATH=. python benchmarks/accelerator_suite.py --out DIR            # on the GPU machine (< 8 min)
    PYTHONPATH=. python benchmarks/accelerator_suite.py --out DIR --smoke    # any machine: toy shapes (< 1 min on CPU)

Options: --budget-s S (default 420, counted from the process's start: each section gets its share of
what is left, checked between sections and between a section's rows; what is left out is recorded as
"skipped: time budget"), --hard-limit-s S (default 540: a watchdog writes what there is, marks the
running section and exits 0), --tiles-out PATH (where the tile table goes;
default jaxtune/kernels/tiles.json, the table `jaxtune.kernels.tiles` reads; with --smoke
DIR/tiles.smoke.json), --sections a,b (a subset, by key below), --mfu-batch N (rows of the ~1B
training step, default 8 x 2048 tokens), --rank R (LoRA rank of the kernel sections, default 16).

Writes DIR/accelerator_suite.json (everything, rewritten after every row) and DIR/accelerator_suite.md
(a header line ``accelerator suite, <date>, <device kind> x <count>, jax <version>``, one table per
section, then the goals of the project's issue against the figures; also printed to stdout at the end).
Progress lines with timestamps go to stderr. Every section runs in its own try/except: an error is
recorded (in its table and the JSON) and the next section runs. Without an accelerator
(``jax.default_backend() == "cpu"``) and without --smoke it prints one line saying so, writes
DIR/accelerator_suite.json with ``"accelerator": false`` (no Markdown) and exits 0.

Sections (key: what):

1. ``kernel_correctness``: `jaxtune.quant.matmul.quant_lora_matmul` with the fused Pallas kernel vs
   XLA's dequantize-then-matmul on the device, nf4 / fp4 / int4 / int8, bf16 compute, LoRA: the
   output and the gradients dx, dA, dB (benchmarks/qlora_matmul.py ``cases``' inputs, the weights passed
   as arguments: ``cases`` closes over them and jit would embed them as constants); max abs error, error
   relative to the reference's largest magnitude and relative L2 error; pass at rel <= 2e-2 and
   L2 <= 1e-2 (a few bf16 ulps: both accumulate in float32 in different orders).
2. ``kernel_timing``: forward at Llama-8B projection shapes (K, N) in (4096, 4096), (4096, 14336),
   (14336, 4096), M in 1, 16, 128, 2048, 8192: bf16 ``x @ W``, XLA dequantize + matmul + LoRA (nf4),
   the fused kernel + LoRA for nf4, int8, int4 (heuristic tiles unless a table entry exists); median
   of repeats after a warm-up (fewer at large M); speedups of fused nf4 over dense and over XLA, and
   its roofline floor (max of FLOPs / peak and bytes / HBM bandwidth, qlora_matmul's figures).
3. ``tile_table``: qlora_matmul's autotune on a reduced candidate set (the heuristic's tiles and four
   more per shape) for the shapes above, nf4; an entry per shape (the fastest tiles, or "xla" where
   XLA's time is lower) merged into the tile table (`jaxtune.kernels.tiles.write`); the entries are in
   the JSON too. ``python benchmarks/qlora_matmul.py --autotune`` is the full search.
4. ``attention``: forward + backward (gradients of q, k, v) of `jaxtune.models.attention.attend` at
   2,048 and 8,192 tokens, batch 1, 32 query / 8 key-value heads, head_dim 128, bf16, causal:
   blockwise, flash (Pallas, Triton), cudnn, xla (dense; skipped where XLA's temporaries would not
   fit); a fallback to blockwise (logged by jaxtune) is noted in the row. TFLOP/s count 7 * heads *
   L^2 * head_dim (causal half of forward 4 h L^2 d, backward 2.5x forward).
5. ``train_mfu``: a ~1B Llama (hidden 2048, 16 layers, 16 / 8 heads, FFN 5632, vocab 32000), seq
   2048, float32 params, bf16 compute, AdamW, remat none and full: tokens/s and MFU
   (`jaxtune.train.metrics.model_flops_per_token` over `device_peak_flops`). Attention: the fastest
   of section 4's blockwise / flash / cudnn that ran without falling back (else auto); a failure
   retries with blockwise attention, out of memory at half the batch.
6. ``qlora_step``: configs/qlora_llama3_8b.yaml (NF4, double quant, LoRA r64 on all linears,
   adamw8bit, remat full, batch 16 x 1024 in 4 micro-batches) with the llama-3.1-8b preset cut to one
   layer, in a fresh process (its peak memory is its own; on an accelerator it starts first, plans and
   compiles while sections 1-5 run, and allocates and runs only when section 6 begins): step time,
   measured peak (``memory_stats()["peak_bytes_in_use"]``, the process's whole life; the figures after
   compiling and after building the state are in the JSON), XLA's compiled peak and `jaxtune
   estimate`'s figure (`jaxtune.job.plan_step` + `jaxtune.train.memory.estimate`); estimate /
   measured. Parameters are random values of the planned shapes (the figures do not depend on them).

--smoke runs all six at toy shapes (Pallas in its interpreter, flash attention through
``gpu_flash_attention(interpret=True)``, a 2-layer tiny model, 1 repeat, XLA at
--xla_backend_optimization_level=0, section 6's process started in section 6) so that every section,
the JSON, the Markdown and the tile-table writing are exercised; its timings and goals mean nothing
(goals read n/a). Uses only jax, numpy and jaxtune (no torch, no pandas).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import datetime
import gc
import importlib.util
import json
import logging
import math
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Optional

START = time.monotonic()  # the budget and the hard limit count from here (JAX's start-up included)
HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
if __name__ == "__main__" and "--smoke" in sys.argv[1:] and "xla_backend_optimization_level" not in os.environ.get(
        "XLA_FLAGS", ""):
    # toy shapes whose timings mean nothing: compile fast. XLA reads its flags when jax is imported.
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

GiB = 2**30
KINDS = ("nf4", "fp4", "int4", "int8")
ATTENTION_IMPLS = ("blockwise", "flash", "cudnn", "xla")
JSON_NAME, MD_NAME = "accelerator_suite.json", "accelerator_suite.md"
WHAT = ("kernel correctness vs XLA (nf4/fp4/int4/int8, forward + dx/dA/dB), kernel timing at Llama-8B projection "
        "shapes (bf16 dense vs XLA dequant vs fused nf4/int8/int4), the tile table (autotune), attention fwd+bwd at "
        "2k/8k tokens (blockwise/flash/cudnn/xla), MFU of a ~1B Llama training step (remat none/full), a one-layer "
        "Llama-8B QLoRA step's time and peak memory vs `jaxtune estimate`")


# --- sizes -----------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Sizes:
    """Shapes and repeats of one run: `FULL` on an accelerator, `SMOKE` for --smoke."""

    rank: int
    correctness: tuple  # (M, K, N)
    timing_ms: tuple  # M, in the order they are measured (goal rows first)
    timing_kn: tuple  # (K, N)
    repeats: Callable[[int], int]  # M -> repeats of a kernel timing
    autotune_candidates: int  # of the reduced list (after the heuristic's tiles)
    attn_lengths: tuple
    attn_heads: tuple  # (heads, kv heads, head_dim)
    attn_repeats: int
    mfu_model: dict
    mfu_seq: int
    mfu_batch: int
    train_repeats: int
    qlora_overrides: tuple  # key=value on top of configs/qlora_llama3_8b.yaml
    qlora_model: Optional[dict]  # None: the llama-3.1-8b preset with one layer
    qlora_repeats: int


FULL = Sizes(
    rank=16,
    correctness=((16, 4096, 4096), (512, 4096, 4096)),
    timing_ms=(1, 16, 2048, 8192, 128),
    timing_kn=((4096, 4096), (4096, 14336), (14336, 4096)),
    repeats=lambda m: 20 if m <= 128 else (10 if m <= 2048 else 5),
    autotune_candidates=4,
    attn_lengths=(2048, 8192),
    attn_heads=(32, 8, 128),
    attn_repeats=10,
    mfu_model=dict(family="llama", vocab_size=32000, hidden_size=2048, num_layers=16, num_heads=16, num_kv_heads=8,
                   head_dim=128, intermediate_size=5632, max_position_embeddings=4096),
    mfu_seq=2048,
    mfu_batch=8,
    train_repeats=5,
    qlora_overrides=(),
    qlora_model=None,
    qlora_repeats=5,
)

SMOKE = Sizes(
    rank=8,
    correctness=((16, 256, 256),),
    timing_ms=(1, 64),
    timing_kn=((256, 256),),
    repeats=lambda m: 1,
    autotune_candidates=1,
    attn_lengths=(128,),
    attn_heads=(4, 2, 32),
    attn_repeats=1,
    mfu_model=dict(family="llama", vocab_size=256, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                   head_dim=16, intermediate_size=128, max_position_embeddings=128),
    mfu_seq=64,
    mfu_batch=2,
    train_repeats=1,
    qlora_overrides=("train.batch_size=4", "train.seq_len=64", "train.grad_accum=2", "train.loss_chunk_tokens=64"),
    qlora_model=dict(family="llama", vocab_size=512, hidden_size=128, num_layers=1, num_heads=4, num_kv_heads=2,
                     head_dim=32, intermediate_size=256, max_position_embeddings=256),
    qlora_repeats=1,
)


# --- the run: results, flushing, budget ------------------------------------------------------------

def _now() -> str:
    return datetime.datetime.now().strftime("%H:%M:%S")


def _error_text(err: BaseException) -> str:
    text = f"{type(err).__name__}: {err}".strip()
    return text if len(text) <= 2000 else text[:2000] + " ..."


def _plain(value: Any) -> Any:
    """JSON-safe: numpy scalars to Python, non-finite floats to strings, tuples to lists."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (np.generic,)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


class Section:
    """One section's record: rows (dicts), notes, summary figures; every change is flushed to disk."""

    def __init__(self, suite: "Suite", key: str, number: int, title: str, columns: list, deadline: float):
        self.suite, self.deadline = suite, deadline
        self.record = {"number": number, "title": title, "status": "running", "seconds": None, "error": None,
                       "traceback": None, "columns": columns, "rows": [], "notes": [], "summary": {}}
        self.skipped_rows = 0

    def add(self, row: dict) -> dict:
        self.record["rows"].append(row)
        self.suite.flush()
        return row

    def note(self, text: str) -> None:
        self.record["notes"].append(text)
        self.suite.flush()

    def out_of_time(self) -> bool:
        return time.monotonic() > self.deadline

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def skip(self, row: dict) -> None:
        """A row not measured for lack of time."""
        self.skipped_rows += 1
        self.add({**row, "note": "skipped: time budget"})

    def goal(self, name: str, criterion: str, measured: str, passed: Optional[bool]) -> str:
        """Record one of the issue's goals (``name``: what, ``criterion``: the target) against a figure;
        -> the row's cell. A smoke run's figures judge nothing (n/a)."""
        if self.suite.smoke:
            passed = None
        self.suite.data["goals"].append({"section": self.record["number"], "goal": f"{name}: {criterion}",
                                         "measured": measured, "pass": passed})
        return f"{_verdict(passed)} ({criterion})"

    def fits(self, seconds: float) -> bool:
        """Whether a row like one that took ``seconds`` still fits in this section's time."""
        return self.remaining() > seconds


def _verdict(passed: Optional[bool]) -> str:
    return "pass" if passed else ("FAIL" if passed is False else "n/a")


class Suite:
    def __init__(self, args, sizes: Sizes):
        self.args, self.sizes, self.smoke = args, sizes, args.smoke
        self.t0 = START
        self.deadline = self.t0 + args.budget_s
        self.out = Path(args.out)
        self.lock = threading.RLock()
        self.ctx: dict = {}  # figures one section hands a later one
        self.child: Optional[subprocess.Popen] = None  # section 6's process
        self.child_result: Optional[Path] = None
        self.child_go: Optional[Path] = None
        self.child_tail: collections.deque = collections.deque(maxlen=40)
        self.current: Optional[Section] = None
        device = jax.devices()[0]
        self.device_kind = device.device_kind
        self.data = {
            "suite": "accelerator", "accelerator": jax.default_backend() != "cpu", "smoke": self.smoke,
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "device_kind": device.device_kind, "device_count": jax.device_count(), "backend": jax.default_backend(),
            "platform_version": _platform_version(), "jax_version": jax.__version__, "jaxlib_version": _jaxlib_version(),
            "python": platform.python_version(), "argv": sys.argv[1:], "budget_s": args.budget_s,
            "hard_limit_s": args.hard_limit_s, "elapsed_s": 0.0, "finished": False, "sections": {}, "goals": [],
        }

    def log(self, message: str) -> None:
        print(f"[{_now()} +{time.monotonic() - self.t0:6.1f}s] {message}", file=sys.stderr, flush=True)

    def flush(self) -> None:
        """Both files, now; a failure to write one is reported on stderr, never raised."""
        with self.lock:
            self.data["elapsed_s"] = round(time.monotonic() - self.t0, 1)
            for name, render in ((JSON_NAME, lambda: json.dumps(_plain(self.data), indent=1) + "\n"),
                                 (MD_NAME, lambda: markdown(self.data))):
                try:
                    self.out.mkdir(parents=True, exist_ok=True)
                    _write_atomic(self.out / name, render())
                except Exception as err:
                    self.log(f"could not write {name}: {_error_text(err)[:300]}")

    def run(self, key: str, number: int, title: str, columns: list, share: float, shares_left: float,
            fn: Callable[[Section], None]) -> None:
        """Run one section under its share of what is left of the budget; record, never raise."""
        now = time.monotonic()
        left = self.deadline - now
        deadline = now + max(0.0, left) * share / max(shares_left, 1e-9)
        section = Section(self, key, number, title, columns, min(deadline, self.deadline))
        self.data["sections"][key] = section.record
        self.current = section
        if left <= 1.0:
            section.record["status"] = "skipped: time budget"
            section.record["rows"].append({"note": "skipped: time budget"})
            self.log(f"section {number} ({key}): skipped: time budget")
            self.flush()
            return
        self.log(f"section {number} ({key}): start, {section.remaining():.0f} s of {left:.0f} s left")
        self.flush()
        start = time.monotonic()
        try:
            fn(section)
            section.record["status"] = "partial: time budget" if section.skipped_rows else "ok"
            failed = sum(1 for row in section.record["rows"] if row.get("error"))
            if failed:
                section.record["status"] += f", errors in {failed} row(s)"
        except Exception as err:  # recorded, and the next section runs
            section.record["status"] = "error"
            section.record["error"] = _error_text(err)
            section.record["traceback"] = traceback.format_exc()[-4000:]
            self.log(f"section {number} ({key}): ERROR {_error_text(err)[:300]}")
        section.record["seconds"] = round(time.monotonic() - start, 1)
        self.current = None
        self.log(f"section {number} ({key}): {section.record['status']} in {section.record['seconds']} s")
        self.flush()
        _release_memory()

    def stop_at_hard_limit(self) -> None:
        """Watchdog: write what there is, mark the running section, end the process (exit 0)."""
        if not self.lock.acquire(timeout=30):
            os._exit(0)
        try:
            self.log(f"hard limit of {self.args.hard_limit_s} s reached: writing results and exiting")
            if self.current is not None:
                self.current.record["status"] = "stopped: hard time limit"
                self.current.record["error"] = f"stopped: the suite's hard limit of {self.args.hard_limit_s} s was reached"
            self.data["stopped"] = "hard time limit"
            for record in self.data["sections"].values():
                if record["status"] == "pending":
                    record["status"] = "not run: hard time limit"
            if self.child is not None and self.child.poll() is None:
                self.child.kill()
            for attempt in range(3):  # (the main thread may be changing a record as we write it)
                try:
                    self.flush()
                    print(markdown(self.data), flush=True)
                    break
                except Exception:
                    time.sleep(0.2)
        finally:
            os._exit(0)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _platform_version() -> Optional[str]:
    try:
        return str(jax.devices()[0].client.platform_version)
    except Exception:
        return None


def _jaxlib_version() -> Optional[str]:
    try:
        import jaxlib

        return jaxlib.__version__
    except Exception:
        return None


def _release_memory() -> None:
    gc.collect()
    try:
        jax.clear_caches()
    except Exception:
        pass


def _bench(name: str):
    """A module of benchmarks/ by path (reused, not copied)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", HERE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # (dataclasses and pickling look modules up by name)
    spec.loader.exec_module(module)
    return module


def _memory_stats() -> Optional[dict]:
    try:
        stats = jax.devices()[0].memory_stats()
    except Exception:
        return None
    return dict(stats) if stats else None


def _is_oom(err: BaseException) -> bool:
    text = str(err)
    return "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower() or "OOM" in text


def _f32(a) -> np.ndarray:
    return np.asarray(jnp.asarray(a).astype(jnp.float32))


def _errors(ref, got) -> dict:
    """max abs error, that over the reference's largest magnitude, relative L2 error, finiteness."""
    r, g = _f32(ref), _f32(got)
    diff = np.abs(r - g)
    scale = float(np.max(np.abs(r))) if r.size else 0.0
    norm = float(np.linalg.norm(r))
    return {"abs": float(np.max(diff)) if diff.size else 0.0,
            "rel": float(np.max(diff)) / scale if scale > 0 else float(np.max(diff)),
            "l2": float(np.linalg.norm(r - g)) / norm if norm > 0 else float(np.linalg.norm(r - g)),
            "finite": bool(np.all(np.isfinite(g)))}


# --- the quantized matmul cases (benchmarks/qlora_matmul.py ``cases``, weights as arguments) ----------
#
# ``cases`` closes over the weights, so jit embeds them in the program as constants: at 4096 x 14336
# a 235 MB HLO and seconds of compile per function. These are its values (same keys, scales, LoRA
# scale 2.0, x as the LoRA input too) with every array an argument; the weights are cached per shape.

def _weights(suite: "Suite", k: int, n: int, kind: str):
    """-> (w bf16 [k, n], a [k, r], b [r, n], w quantized as ``kind``), as ``cases`` makes them."""
    from jaxtune.quant import QuantConfig, quantize_kernel

    cache = suite.ctx.setdefault("weights", {})
    key = (k, n, suite.sizes.rank, kind)
    if key not in cache:
        keys = jax.random.split(jax.random.key(0), 5)
        rank = suite.sizes.rank
        w = (jax.random.normal(keys[1], (k, n)) * 0.02).astype(jnp.bfloat16)
        a = (jax.random.normal(keys[2], (k, rank)) * 0.02).astype(jnp.bfloat16)
        b = (jax.random.normal(keys[3], (rank, n)) * 0.02).astype(jnp.bfloat16)
        q = quantize_kernel(w, QuantConfig(kind=kind, double_quant=kind in ("nf4", "fp4")))
        cache[key] = (w, a, b, q)
    return cache[key]


def _activations(m: int, k: int, n: int):
    """-> (x [m, k], dy [m, n]) as ``cases`` makes them."""
    keys = jax.random.split(jax.random.key(0), 5)
    return jax.random.normal(keys[0], (m, k), jnp.bfloat16), jax.random.normal(keys[4], (m, n), jnp.bfloat16)


_dense_fwd = jax.jit(lambda x, w: x @ w)
_QUANT_FNS: dict = {}


def _quant_fns(impl: str):
    """-> jitted (forward(x, qw, a, b), forward+backward(x, qw, a, b, dy) -> (y, (dx, dA, dB))) by ``impl``."""
    if impl not in _QUANT_FNS:
        from jaxtune.quant.matmul import quant_lora_matmul

        def fwd(x, qw, a, b):
            return quant_lora_matmul(x, x, qw, a, b, 2.0, "bfloat16", impl)

        def fwd_bwd(x, qw, a, b, dy):  # the output and (dx, dA, dB): both passes run
            y, pullback = jax.vjp(lambda x, a, b: quant_lora_matmul(x, x, qw, a, b, 2.0, "bfloat16", impl), x, a, b)
            return y, pullback(dy)

        _QUANT_FNS[impl] = (jax.jit(fwd), jax.jit(fwd_bwd))
    return _QUANT_FNS[impl]


# --- 1. kernel correctness -------------------------------------------------------------------------

CORRECTNESS_REL, CORRECTNESS_L2 = 2e-2, 1e-2


def kernel_correctness(sec: Section, suite: Suite) -> None:
    impl = "interpret" if suite.smoke else "pallas"
    sec.record["summary"].update(impl=impl, rank=suite.sizes.rank, tolerance={"rel": CORRECTNESS_REL, "l2": CORRECTNESS_L2})
    for m, k, n in suite.sizes.correctness:
        for kind in KINDS:
            row = {"kind": kind, "M": m, "K": k, "N": n}
            if sec.out_of_time():
                sec.skip(row)
                continue
            suite.log(f"  correctness {kind} M={m} K={k} N={n}")
            try:
                _, a, b, q = _weights(suite, k, n, kind)
                x, dy = _activations(m, k, n)
                want = _quant_fns("xla")[1](x, q, a, b, dy)  # (y, (dx, dA, dB))
                got = _quant_fns(impl)[1](x, q, a, b, dy)
                ok = True
                for name, r, g in zip(("y", "dx", "dA", "dB"), (want[0], *want[1]), (got[0], *got[1])):
                    e = _errors(r, g)
                    row[f"{name}_abs"], row[f"{name}_rel"], row[f"{name}_l2"] = e["abs"], e["rel"], e["l2"]
                    ok &= e["finite"] and e["rel"] <= CORRECTNESS_REL and e["l2"] <= CORRECTNESS_L2
                row["pass"] = bool(ok)
            except Exception as err:
                row["error"] = _error_text(err)
                row["pass"] = False
            sec.add(row)
    rows = [r for r in sec.record["rows"] if "pass" in r]
    if rows:
        sec.goal("fused kernel vs XLA, nf4/fp4/int4/int8", "forward, dx, dA, dB within tolerance",
                 f"{sum(r['pass'] for r in rows)}/{len(rows)} cases pass", all(r["pass"] for r in rows))


# --- 2. kernel timing ------------------------------------------------------------------------------

def kernel_timing(sec: Section, suite: Suite) -> None:
    qm = _bench("qlora_matmul")
    from jaxtune.train.metrics import device_peak_flops

    impl = "interpret" if suite.smoke else "pallas"
    rank = suite.sizes.rank
    peak = device_peak_flops(suite.device_kind, "bfloat16")
    bw = qm.bandwidth(suite.device_kind)
    sec.record["summary"].update(impl=impl, rank=rank, peak_flops=peak, hbm_bytes_per_s=bw,
                                 lora="the quantized rows include the LoRA term (rank above); the dense row does not",
                                 tiles="fused rows use the tile table's entries where present, else the heuristic")
    xla_seconds = suite.ctx.setdefault("xla_nf4_seconds", {})
    fwd_xla, fwd_fused = _quant_fns("xla")[0], _quant_fns(impl)[0]
    for m in suite.sizes.timing_ms:
        for k, n in suite.sizes.timing_kn:
            row = {"M": m, "K": k, "N": n}
            if sec.out_of_time():
                sec.skip(row)
                continue
            repeats = suite.sizes.repeats(m)
            suite.log(f"  timing M={m} K={k} N={n} ({repeats} repeats)")
            errors = []

            def timed(key, fn, *inputs):
                try:
                    row[key] = qm.median_seconds(lambda: fn(*inputs), repeats) * 1e3
                except Exception as err:
                    errors.append(f"{key}: {_error_text(err)[:400]}")

            nf4_bytes = None
            try:
                x, _ = _activations(m, k, n)
                w, a, b, q = _weights(suite, k, n, "nf4")
                nf4_bytes = q.nbytes
                timed("dense_ms", _dense_fwd, x, w)
                timed("xla_nf4_ms", fwd_xla, x, q, a, b)
                timed("fused_nf4_ms", fwd_fused, x, q, a, b)
                for kind in ("int8", "int4"):
                    _, a, b, q = _weights(suite, k, n, kind)
                    timed(f"fused_{kind}_ms", fwd_fused, x, q, a, b)
            except Exception as err:
                errors.append(_error_text(err)[:600])
            if "xla_nf4_ms" in row:
                xla_seconds[(m, k, n)] = row["xla_nf4_ms"] / 1e3
            fused = row.get("fused_nf4_ms")
            if fused and row.get("dense_ms"):
                row["nf4_vs_dense"] = row["dense_ms"] / fused
            if fused and row.get("xla_nf4_ms"):
                row["nf4_vs_xla"] = row["xla_nf4_ms"] / fused
            if fused and nf4_bytes:
                flops = 2 * m * k * n + 2 * m * rank * (k + n)
                moved = nf4_bytes + 2 * (m * k + m * n)
                floor = max(flops / peak if peak else 0.0, moved / bw if bw else 0.0)
                if floor:
                    row["floor_ms"] = floor * 1e3
                    row["x_floor"] = fused / (floor * 1e3)
            row["goal"] = _timing_goal(sec, row)
            if errors:
                row["error"] = "; ".join(errors)
            sec.add(row)
    sec.record["rows"].sort(key=lambda r: (r.get("K", 0), r.get("N", 0), r.get("M", 0)))


def _timing_goal(sec: Section, row: dict) -> str:
    m, vs_dense, vs_xla = row["M"], row.get("nf4_vs_dense"), row.get("nf4_vs_xla")
    shape = f"M={m} K={row['K']} N={row['N']}"
    if m <= 16 and vs_dense is not None and vs_xla is not None:
        return sec.goal(f"fused nf4, decode {shape}", ">= 3x dense, >= 5x XLA",
                        f"{vs_dense:.2f}x dense, {vs_xla:.2f}x XLA", vs_dense >= 3.0 and vs_xla >= 5.0)
    if m >= 2048 and vs_dense is not None:
        return sec.goal(f"fused nf4, {shape}", ">= 0.9x dense", f"{vs_dense:.2f}x dense", vs_dense >= 0.9)
    return ""


# --- 3. tile table ---------------------------------------------------------------------------------

def _candidates(m: int, heuristic, count: int) -> list:
    from jaxtune.kernels.quant_matmul import Tiles

    if m <= 16:
        more = [Tiles(bm=16, bn=bn, bk=64, splits=s, num_warps=4, num_stages=4) for bn in (64, 128) for s in (4, 16)]
    else:
        more = [Tiles(bm=bm, bn=bn, bk=64, splits=1, num_warps=w, num_stages=3)
                for bm, bn, w in ((64, 128, 4), (128, 128, 8), (128, 256, 8), (64, 64, 4))]
    out = [heuristic] if heuristic is not None else []
    for t in more[:count]:
        if t not in out:
            out.append(t)
    return out


def tile_table(sec: Section, suite: Suite) -> None:
    """qlora_matmul's ``autotune`` (kernel without LoRA per candidate vs XLA dequant + LoRA; "xla"
    where no candidate beats it) on fewer candidates, written through `jaxtune.kernels.tiles.write`."""
    qm = _bench("qlora_matmul")
    from jaxtune.kernels import tiles as table
    from jaxtune.kernels.quant_matmul import forward
    from jaxtune.quant.matmul import code_table, kernel_scales

    interpret = suite.smoke
    path = Path(suite.args.tiles_out) if suite.args.tiles_out else (
        suite.out / "tiles.smoke.json" if suite.smoke else table.TABLE)
    entries: dict = {}
    sec.record["summary"].update(tiles_path=str(path), kind="nf4", entries=entries, written=0, chose_xla=[])
    xla_seconds = suite.ctx.get("xla_nf4_seconds", {})
    fields = ("bm", "bn", "bk", "splits", "num_warps", "num_stages")
    for m in suite.sizes.timing_ms:
        for k, n in suite.sizes.timing_kn:
            row = {"M": m, "K": k, "N": n}
            if sec.out_of_time():
                sec.skip(row)
                continue
            repeats = max(1, suite.sizes.repeats(m) // 2)
            try:
                x, _ = _activations(m, k, n)
                _, a, b, q = _weights(suite, k, n, "nf4")
                xla = xla_seconds.get((m, k, n))
                if xla is None:
                    xla = qm.median_seconds(lambda: _quant_fns("xla")[0](x, q, a, b), repeats)
                codes, scales = q.codes, kernel_scales(q)
                heuristic = table.choose(m, n, k, "nf4", q.blocksize, "")  # device "": no entry, the heuristic
                candidates = _candidates(m, heuristic, suite.sizes.autotune_candidates)
                suite.log(f"  autotune M={m} K={k} N={n}: {len(candidates)} candidates")
                best, failed = None, []
                for t in candidates:
                    if sec.out_of_time() and best is not None:
                        break
                    try:
                        fn = jax.jit(lambda x, codes, scales, t=t: forward(
                            x, codes, scales, kind=q.kind, table=code_table(q.kind), blocksize=q.blocksize, n=n,
                            tiles=t, interpret=interpret))
                        s = qm.median_seconds(lambda: fn(x, codes, scales), repeats)
                    except Exception as err:  # a candidate the hardware cannot hold (shared memory, registers)
                        failed.append(f"{_tiles_text(t)}: {_error_text(err)[:200]}")
                        continue
                    if best is None or s < best[0]:
                        best = (s, t)
                entry = "xla" if best is None or best[0] > xla else {f: getattr(best[1], f) for f in fields}
                name = table.key(suite.device_kind, "nf4", m, n, k)
                entries[name] = entry
                table.write({name: entry}, path)
                sec.record["summary"]["written"] = len(entries)
                if entry == "xla":
                    sec.record["summary"]["chose_xla"].append(f"M={m} K={k} N={n}")
                row.update(xla_ms=xla * 1e3, best_ms=None if best is None else best[0] * 1e3,
                           best_tiles=None if best is None else _tiles_text(best[1]), tried=len(candidates),
                           failed=len(failed), choice="xla" if entry == "xla" else "kernel")
                if failed:
                    row["failures"] = failed
                    row["note"] = f"{len(failed)} candidate(s) failed to compile or run"
            except Exception as err:
                row["error"] = _error_text(err)
            sec.add(row)
    sec.record["rows"].sort(key=lambda r: (r.get("K", 0), r.get("N", 0), r.get("M", 0)))
    copy = ""
    if entries and path.resolve().parent != suite.out.resolve():
        try:  # a copy beside the results (only the output folder may come back from the machine)
            _write_atomic(suite.out / "tiles.json", path.read_text())
            copy = f" (a copy of the table: {suite.out / 'tiles.json'})"
        except OSError:
            pass
    sec.note(f"{len(entries)} entries written to {path}{copy}; XLA chosen for "
             f"{', '.join(sec.record['summary']['chose_xla']) or 'no shape'}")


def _tiles_text(t) -> str:
    return f"bm{t.bm} bn{t.bn} bk{t.bk} s{t.splits} w{t.num_warps} st{t.num_stages}"


# --- 4. attention ----------------------------------------------------------------------------------

class _Captured(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def attention(sec: Section, suite: Suite) -> None:
    suite.ctx.pop("weights", None)  # the kernel sections' matrices
    _release_memory()
    qm = _bench("qlora_matmul")
    ab = _bench("attention")
    from jaxtune.models import attention as attention_module

    heads, kv_heads, head_dim = suite.sizes.attn_heads
    sec.record["summary"].update(batch=1, heads=heads, kv_heads=kv_heads, head_dim=head_dim, dtype="bfloat16",
                                 causal=True, flops="7 * heads * L^2 * head_dim (causal fwd + bwd)")
    logger = logging.getLogger(attention_module.__name__)
    timings: dict = {}
    for length in suite.sizes.attn_lengths:
        qkv = mask = None
        for impl in ATTENTION_IMPLS:
            row = {"length": length, "impl": impl}
            if sec.out_of_time():
                sec.skip(row)
                continue
            suite.log(f"  attention {impl} L={length}")
            try:
                if qkv is None:
                    qkv, mask = ab.inputs(1, length, heads, kv_heads, head_dim)
                    qkv = [a.astype(jnp.bfloat16) for a in qkv]
                captured = _Captured()
                getattr(attention_module, "_warned", set()).clear()  # warn again for this call
                logger.addHandler(captured)
                try:
                    fn = _flash_interpret_step(mask) if impl == "flash" and suite.smoke else ab.step(impl, mask, 0)
                    compiled = fn.lower(*qkv).compile()
                finally:
                    logger.removeHandler(captured)
                temp = _temp_bytes(compiled)
                row["temp_gib"] = None if temp is None else temp / GiB
                stats = _memory_stats()
                if impl == "xla" and temp is not None and stats and "bytes_limit" in stats:
                    free = stats["bytes_limit"] - stats.get("bytes_in_use", 0)
                    if temp > 0.9 * free:
                        row["note"] = f"skipped: would not fit ({temp / GiB:.1f} GiB temporaries, {free / GiB:.1f} free)"
                        sec.add(row)
                        continue
                seconds = qm.median_seconds(lambda: compiled(*qkv), suite.sizes.attn_repeats)
                row["ms"] = seconds * 1e3
                row["tflops"] = 7 * heads * length**2 * head_dim / seconds / 1e12
                if captured.messages:
                    row["note"] = "fell back: " + "; ".join(captured.messages)[:400]
                else:
                    timings.setdefault(length, {})[impl] = seconds
                compiled = None  # (its buffers go before the next implementation's)
            except Exception as err:
                row["error"] = _error_text(err)
            sec.add(row)
    if timings:
        first = timings[min(timings)]
        usable = {i: s for i, s in first.items() if i in ("flash", "cudnn", "blockwise")}
        if usable:
            choice = min(usable, key=usable.get)
            suite.ctx["attention_for_training"] = choice
            sec.note(f"fastest at {min(timings)} tokens without fallback (blockwise / flash / cudnn): {choice} "
                     "(used by the training section)")


def _flash_interpret_step(mask):
    """benchmarks/attention.py's ``step`` for the Pallas GPU flash kernel in its interpreter (--smoke on CPU)."""
    from jaxtune.kernels.flash_attention import gpu_flash_attention

    def loss(q, k, v):
        out = gpu_flash_attention(q, k, v, mask, interpret=True)
        return jnp.sum(out * jnp.cos(jnp.arange(out.shape[-1], dtype=out.dtype)))

    return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def _temp_bytes(compiled) -> Optional[int]:
    try:
        analysis = compiled.memory_analysis()
        return int(analysis.temp_size_in_bytes) if analysis is not None else None
    except Exception:
        return None


# --- 5. training MFU -------------------------------------------------------------------------------

def train_mfu(sec: Section, suite: Suite) -> None:
    qm = _bench("qlora_matmul")
    from jaxtune.models import Model, ModelConfig
    from jaxtune.train.losses import causal_lm_loss
    from jaxtune.train.metrics import device_peak_flops, model_flops_per_token
    from jaxtune.train.optim import OptimConfig, build_optimizer
    from jaxtune.train.step import TrainState, make_train_step

    z = suite.sizes
    attn = suite.ctx.get("attention_for_training", "auto")
    cfg = ModelConfig(**z.mfu_model, param_dtype="float32", dtype="bfloat16", attention_impl=attn)
    seq, batch_rows = z.mfu_seq, suite.args.mfu_batch or z.mfu_batch
    peak = device_peak_flops(suite.device_kind, "bfloat16")
    per_token = model_flops_per_token(cfg, seq)
    opt, schedule = build_optimizer(OptimConfig(lr=1e-4, weight_decay=0.1, clip_norm=1.0, schedule="constant"), 1000)
    params = Model(cfg).init(jax.random.key(0))
    n_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))
    sec.record["summary"].update(model=dict(z.mfu_model), params=n_params, seq=seq, param_dtype="float32",
                                 dtype="bfloat16", attention=attn, optimizer="adamw", peak_flops=peak,
                                 flops_per_token=per_token)
    last = 0.0  # seconds the previous variant took (compile included): the next one is about as long
    for remat in ("none", "full"):
        row = {"remat": remat, "attention": attn, "batch": batch_rows, "seq": seq}
        if sec.out_of_time() or not sec.fits(0.8 * last):
            sec.skip(row)
            continue
        started = time.monotonic()
        rows = batch_rows
        for attempt in range(3):
            row.update(batch=rows, attention=attn)
            suite.log(f"  train step remat={remat} batch {rows} x {seq} attention={attn}")
            try:
                _train_row(row, cfg.replace(remat=remat, attention_impl=attn), params, opt, schedule, rows, seq,
                           z.train_repeats, qm, Model, causal_lm_loss, TrainState, make_train_step)
                break
            except Exception as err:
                _release_memory()
                if attempt < 2 and _is_oom(err) and rows > 1:
                    sec.note(f"remat {remat}: out of memory at batch {rows}; retrying at {rows // 2}")
                    rows //= 2
                    continue
                if attempt < 2 and attn != "blockwise":  # the kernel's failure should not cost the MFU figure
                    sec.note(f"remat {remat}: attention {attn} failed ({_error_text(err)[:300]}); retrying with "
                             "blockwise attention")
                    attn = "blockwise"
                    continue
                row["error"] = _error_text(err)
                break
        if "step_s" in row:
            tokens = rows * seq
            row["tokens_per_s"] = tokens / row["step_s"]
            row["model_tflops"] = row["tokens_per_s"] * per_token / 1e12
            if peak:
                row["mfu"] = row["tokens_per_s"] * per_token / peak
                row["goal"] = sec.goal(f"~1B Llama training step, remat {remat}", ">= 60% MFU",
                                       f"{row['mfu']:.1%}", row["mfu"] >= 0.6)
            else:
                row["note"] = f"no peak FLOP/s known for {suite.device_kind!r}: MFU not computed"
        sec.add(row)
        last = time.monotonic() - started


def _train_row(row, cfg, params, opt, schedule, rows, seq, repeats, qm, Model, causal_lm_loss, TrainState,
               make_train_step) -> None:
    """Time ``rows x seq`` steps of ``cfg`` from ``params`` into ``row`` (first step with compile, then the
    median of ``repeats`` after a warm-up); the state is dropped before returning or raising."""
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (rows, seq + 1)).astype(np.int32)
    batch = {"tokens": jnp.asarray(tokens[:, :-1]), "targets": jnp.asarray(tokens[:, 1:]),
             "segment_ids": jnp.ones((rows, seq), jnp.int32), "loss_mask": jnp.ones((rows, seq), jnp.float32)}
    step = make_train_step(causal_lm_loss(Model(cfg)), opt, schedule)
    holder: dict = {}

    def one():
        holder["state"], holder["metrics"] = step(holder["state"], None, batch)
        return holder["state"]

    try:
        holder["state"] = TrainState.create(params, opt, jax.random.key(1))
        start = time.perf_counter()
        one()
        row["first_loss"] = float(holder["metrics"]["loss"])
        row["first_step_s"] = time.perf_counter() - start
        row["step_s"] = qm.median_seconds(one, repeats)
        row["step_ms"] = row["step_s"] * 1e3
    finally:
        holder.clear()  # (an exception's traceback would otherwise keep the state alive)


# --- 6. one-layer QLoRA step (in a fresh process) --------------------------------------------------

def start_qlora_child(suite: Suite) -> None:
    """Start section 6's process now: it plans, estimates and compiles (CPU work, mostly) while the
    other sections run, then waits for the go file before it allocates anything or runs a step."""
    suite.child_result = suite.out / "qlora_step.child.json"
    suite.child_go = suite.out / "qlora_step.go"
    for path in (suite.child_result, suite.child_go):
        if path.exists():
            path.unlink()
    suite.out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--out", str(suite.out), "--qlora-child",
           str(suite.child_result), "--go-file", str(suite.child_go),
           "--hard-limit-s", str(max(30.0, suite.args.hard_limit_s - (time.monotonic() - START)))]
    if suite.smoke:
        cmd.append("--smoke")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"  # the suite holds its own pool; the child takes what it uses
    suite.log("started the QLoRA step's process (plans and compiles now, runs in section 6)")
    suite.child = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=str(ROOT))
    suite.child_tail = collections.deque(maxlen=40)
    threading.Thread(target=_tee, args=(suite.child.stdout, suite.child_tail), daemon=True).start()


def _tee(stream, tail: collections.deque) -> None:
    """The child's output to our stderr, its last lines kept (for the record, should it fail)."""
    for line in iter(stream.readline, b""):
        text = line.decode(errors="replace")
        tail.append(text.rstrip("\n"))
        sys.stderr.write(text)
        sys.stderr.flush()


def stop_qlora_child(suite: Suite) -> None:
    if suite.child is not None and suite.child.poll() is None:
        suite.child.kill()
        suite.child.wait()
    suite.child = None
    if suite.child_go is not None and suite.child_go.exists():
        suite.child_go.unlink()


def qlora_step(sec: Section, suite: Suite) -> None:
    early = suite.child.poll() if suite.child is not None else None
    if early not in (None, 0):  # the process started early failed: once more, alone on the machine
        sec.note(f"the QLoRA process started early exited with {early} "
                 f"({' / '.join(list(suite.child_tail)[-3:])[:400]}); starting it again")
        suite.child = None
    if suite.child is None:
        start_qlora_child(suite)
    suite.child_go.write_text("go\n")
    timeout = max(15.0, sec.remaining() + 30.0)
    timeout = min(timeout, max(15.0, suite.args.hard_limit_s - (time.monotonic() - START) - 15.0))
    suite.log(f"  QLoRA step: waiting for its process (at most {timeout:.0f} s)")
    try:
        rc = suite.child.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        rc = None
    stop_qlora_child(suite)
    child = json.loads(suite.child_result.read_text()) if suite.child_result.exists() else {}
    sec.record["summary"].update(child)
    row = {k: child.get(k) for k in ("layers", "batch", "seq", "grad_accum", "remat", "lora_rank", "step_ms",
                                      "tokens_per_s", "estimate_gib", "measured_gib", "xla_gib", "ratio")}
    if child.get("note"):
        row["note"] = child["note"]
    if rc is None:
        row["error"] = (f"the QLoRA process did not finish in {timeout:.0f} s (killed while: {child.get('phase')}); "
                        "the figures are as far as it got")
    elif rc != 0 or child.get("error"):
        row["error"] = child.get("error") or f"the QLoRA process exited with {rc} and wrote no result"
    if row.get("error"):
        sec.record["summary"]["child_output_tail"] = list(suite.child_tail)
    ratio = child.get("ratio")
    if isinstance(ratio, (int, float)):
        row["goal"] = sec.goal("1-layer Llama-8B QLoRA step memory", "estimate within 10% of measured peak",
                               f"estimate / measured {ratio:.3f}", 0.9 <= ratio <= 1.1)
    sec.add(row)


def qlora_child(path: Path, smoke: bool, go: Optional[Path] = None, wait_s: float = 600.0) -> int:
    """Section 6's work in its own process: plan, estimate, compile; then (once ``go`` exists) build
    random state, run the step, measure."""
    from jax.sharding import NamedSharding, PartitionSpec as P

    from jaxtune.config import load_config
    from jaxtune.job import TrainJobConfig, plan_step
    from jaxtune.kernels import tiles as table
    from jaxtune.models import ModelConfig
    from jaxtune.models.presets import preset
    from jaxtune.parallel.mesh import BATCH_AXES
    from jaxtune.train.memory import estimate
    from jaxtune.train.step import TrainState, make_train_step, named

    sizes = SMOKE if smoke else FULL
    out: dict = {}
    save = lambda: _write_atomic(path, json.dumps(_plain(out), indent=1) + "\n")  # noqa: E731

    def log(message):
        out["phase"] = message
        print(f"[{_now()}] qlora child: {message}", file=sys.stderr, flush=True)
    try:
        overrides = ["model.hf_dir=null", "model.preset=llama-3.1-8b", *sizes.qlora_overrides]
        job = load_config(TrainJobConfig, ROOT / "configs" / "qlora_llama3_8b.yaml", overrides)
        if sizes.qlora_model is not None:
            cfg = ModelConfig(**sizes.qlora_model)
        else:
            base = preset("llama-3.1-8b")
            cfg = base.replace(num_layers=1, layer_types=base.layer_types[:1])
        job = dataclasses.replace(job, model=dataclasses.replace(job.model, preset=None, config=cfg))
        t = job.train
        out.update(layers=cfg.num_layers, hidden=cfg.hidden_size, vocab=cfg.vocab_size, batch=t.batch_size,
                   seq=t.seq_len, grad_accum=t.grad_accum, remat=t.remat, lora_rank=job.peft.lora.rank,
                   quant=job.model.quant.kind, optimizer=job.optim.name, device_kind=jax.devices()[0].device_kind)
        log("planning")
        plan = plan_step(job)
        est = estimate(plan)
        out["estimate"] = {name: value for name, value in est.rows()}
        out["estimate_gib"] = est.peak / GiB
        entry = table.measured(plan.micro_batch * t.seq_len, cfg.num_heads * cfg.head_dim, cfg.hidden_size, "nf4",
                               jax.devices()[0].device_kind)
        out["q_proj_kernel"] = "fused kernel (tile table)" if entry not in (None, "xla") else "xla (auto)"
        save()
        out["memory_before"] = _memory_stats()
        mesh = plan.mesh
        state_sh, frozen_sh = named(plan.state_specs, mesh), named(plan.frozen_specs, mesh)
        batch_sh = NamedSharding(mesh, P(BATCH_AXES))
        step = make_train_step(plan.loss_fn, plan.optimizer, plan.schedule, grad_accum=t.grad_accum, mesh=mesh,
                               state_shardings=state_sh, frozen_shardings=frozen_sh, batch_shardings=batch_sh)
        with_sh = lambda tree, sh: jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, sh)  # noqa: E731
        abstract_batch = plan.batch(t.batch_size)
        log("compiling the step")
        start = time.perf_counter()
        compiled = step.lower(with_sh(plan.state, state_sh), with_sh(plan.frozen, frozen_sh),
                              {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_sh)
                               for k, v in abstract_batch.items()}).compile()
        out["compile_s"] = time.perf_counter() - start
        try:
            a = compiled.memory_analysis()
            xla = (int(a.argument_size_in_bytes) + int(a.output_size_in_bytes) - int(a.alias_size_in_bytes)
                   + int(a.temp_size_in_bytes))
            out["xla_gib"] = xla / GiB
        except Exception as err:
            out["xla_note"] = f"memory_analysis unavailable: {_error_text(err)[:200]}"
        out["memory_after_compile"] = _memory_stats()
        save()
        if go is not None:
            log("compiled; waiting for the go signal")
            waited = time.monotonic()
            while not go.exists():
                if time.monotonic() - waited > wait_s:
                    raise TimeoutError(f"no go signal in {wait_s:.0f} s")
                time.sleep(0.1)
        log("building random state")
        make = jax.jit(lambda key: (TrainState.create(_random_tree(plan.trainable, jax.random.fold_in(key, 1)),
                                                      plan.optimizer, jax.random.key(0)),
                                    _random_tree(plan.frozen, jax.random.fold_in(key, 2))),
                       out_shardings=(state_sh, frozen_sh))
        state, frozen = make(jax.random.key(0))
        batch = jax.jit(lambda key: _random_batch(abstract_batch, cfg.vocab_size, key),
                        out_shardings=jax.tree.map(lambda _: batch_sh, abstract_batch))(jax.random.key(1))
        jax.block_until_ready((state, frozen, batch))
        out["memory_after_init"] = _memory_stats()
        log("running")
        state, metrics = compiled(state, frozen, batch)
        out["first_loss"] = float(metrics["loss"])
        times = []
        for _ in range(sizes.qlora_repeats):
            start = time.perf_counter()
            state, metrics = compiled(state, frozen, batch)
            jax.block_until_ready(state)
            times.append(time.perf_counter() - start)
        out["step_ms"] = statistics.median(times) * 1e3
        out["tokens_per_s"] = t.batch_size * t.seq_len / statistics.median(times)
        stats = _memory_stats()
        out["memory_after_steps"] = stats
        if stats and "peak_bytes_in_use" in stats:
            out["measured_gib"] = stats["peak_bytes_in_use"] / GiB
            out["ratio"] = est.peak / stats["peak_bytes_in_use"]
            if out.get("xla_gib"):
                out["ratio_to_xla"] = est.peak / (out["xla_gib"] * GiB)
            compile_peak = (out.get("memory_after_compile") or {}).get("peak_bytes_in_use")
            if compile_peak and compile_peak >= stats["peak_bytes_in_use"]:
                out["note"] = "the peak was reached while compiling (autotuning buffers), not by the step"
        else:
            out["note"] = f"memory_stats() gives no peak on {jax.default_backend()}: measured peak not available"
        log("done")
        save()
        return 0
    except Exception as err:
        out["error"] = _error_text(err)
        out["traceback"] = traceback.format_exc()[-4000:]
        save()
        log(f"ERROR {out['error'][:300]}")
        return 1


def _random_tree(tree, key):
    """Random values of an abstract param tree's shapes and dtypes (small normals; random codes)."""
    leaves, treedef = jax.tree.flatten(tree)
    out = []
    for i, leaf in enumerate(leaves):
        k, dtype = jax.random.fold_in(key, i), jnp.dtype(leaf.dtype)
        if jnp.issubdtype(dtype, jnp.floating):
            out.append((jax.random.normal(k, leaf.shape, dtype) * 0.02).astype(dtype))
        elif jnp.issubdtype(dtype, jnp.unsignedinteger):
            out.append(jax.random.bits(k, leaf.shape, dtype))
        elif jnp.issubdtype(dtype, jnp.integer):
            info = jnp.iinfo(dtype)
            out.append(jax.random.randint(k, leaf.shape, max(info.min, -127), min(info.max, 127), dtype))
        else:
            out.append(jnp.zeros(leaf.shape, dtype))
    return jax.tree.unflatten(treedef, out)


def _random_batch(abstract: dict, vocab: int, key) -> dict:
    out = {}
    for name, a in abstract.items():
        if name in ("tokens", "targets"):
            out[name] = jax.random.randint(jax.random.fold_in(key, len(out)), a.shape, 0, vocab, a.dtype)
        elif name == "segment_ids":
            out[name] = jnp.ones(a.shape, a.dtype)
        elif name == "positions":
            out[name] = jnp.broadcast_to(jnp.arange(a.shape[-1], dtype=a.dtype), a.shape)
        elif name == "loss_mask":
            out[name] = jnp.ones(a.shape, a.dtype)
        else:
            out[name] = jnp.zeros(a.shape, a.dtype)
    return out


# --- Markdown ---------------------------------------------------------------------------------------

def _cell(value: Any, fmt: Optional[str]) -> str:
    if value is None or value == "":
        return "—"
    if isinstance(value, str) and fmt not in (None, "text"):
        return value
    try:
        if fmt == "ms":
            return f"{value:.3f}"
        if fmt == "x":
            return f"{value:.2f}x"
        if fmt == "pct":
            return f"{value:.1%}"
        if fmt == "e":
            return f"{value:.1e}"
        if fmt == "f1":
            return f"{value:.1f}"
        if fmt == "f2":
            return f"{value:.2f}"
        if fmt == "f3":
            return f"{value:.3f}"
        if fmt == "int":
            return f"{value:,.0f}"
        if fmt == "bool":
            return "pass" if value else "FAIL"
    except (TypeError, ValueError):
        pass
    return str(value).replace("|", "/").replace("\n", " ")


def markdown(data: dict) -> str:
    lines = [f"## accelerator suite, {data['date']}, {data['device_kind']} x {data['device_count']}, "
             f"jax {data['jax_version']}", ""]
    lines.append(f"Backend {data['backend']} ({data.get('platform_version') or 'unknown platform version'}), jaxlib "
                 f"{data.get('jaxlib_version')}, Python {data['python']}; budget {data['budget_s']} s, elapsed "
                 f"{data['elapsed_s']} s{' (finished)' if data.get('finished') else ''}"
                 f"{'; SMOKE RUN (toy shapes, timings meaningless)' if data.get('smoke') else ''}"
                 f"{'; stopped at the hard time limit' if data.get('stopped') else ''}.")
    for record in data["sections"].values():
        lines += ["", f"### {record['number']}. {record['title']}", ""]
        seconds = f", {record['seconds']} s" if record.get("seconds") is not None else ""
        lines.append(f"Status: {record['status']}{seconds}.")
        if record.get("error"):
            lines.append(f"Error: `{' '.join(record['error'][:600].split()).replace(chr(96), chr(39))}`")
        columns = list(record["columns"])
        rows = record["rows"]
        if any(r.get("note") or r.get("error") for r in rows):
            columns.append(["note", "note", "text"])
        lines += ["", "| " + " | ".join(h for _, h, _ in columns) + " |", "|" + "---|" * len(columns)]
        for r in rows:
            cells = []
            for key, _, fmt in columns:
                if key == "note":
                    text = "; ".join(x for x in (f"error: {r['error']}" if r.get("error") else "", r.get("note") or "") if x)
                    cells.append(_cell(text[:500], "text"))
                else:
                    cells.append(_cell(r.get(key), fmt))
            lines.append("| " + " | ".join(cells) + " |")
        for note in record.get("notes", []):
            lines.append(f"\n{note}")
    if data.get("goals"):
        lines += ["", "### Goals (the project's issue)", "", "| section | goal | measured | result |", "|---|---|---|---|"]
        for g in data["goals"]:
            result = _verdict(g["pass"])
            lines.append(f"| {g['section']} | {g['goal']} | {g['measured']} | {result} |")
    return "\n".join(lines) + "\n"


# --- main -------------------------------------------------------------------------------------------

SECTIONS = [
    # key, title, columns [key, header, format], budget share (seconds of the default 420), function
    ("kernel_correctness", "Kernel correctness: fused Pallas kernel vs XLA dequantize+matmul (bf16, LoRA)",
     [["kind", "kind", None], ["M", "M", None], ["K", "K", None], ["N", "N", None], ["y_abs", "y max abs", "e"],
      ["y_rel", "y rel", "e"], ["y_l2", "y L2", "e"], ["dx_rel", "dx rel", "e"], ["dx_l2", "dx L2", "e"],
      ["dA_rel", "dA rel", "e"], ["dB_rel", "dB rel", "e"], ["pass", "pass (rel <= 2e-2, L2 <= 1e-2)", "bool"]],
     40, kernel_correctness),
    ("kernel_timing", "Kernel timing, forward (ms, median): bf16 dense vs XLA dequant+matmul vs fused kernel",
     [["M", "M", None], ["K", "K", None], ["N", "N", None], ["dense_ms", "bf16 x@W", "ms"],
      ["xla_nf4_ms", "XLA dequant nf4", "ms"], ["fused_nf4_ms", "fused nf4", "ms"], ["fused_int8_ms", "fused int8", "ms"],
      ["fused_int4_ms", "fused int4", "ms"], ["nf4_vs_dense", "nf4 vs dense", "x"], ["nf4_vs_xla", "nf4 vs XLA", "x"],
      ["floor_ms", "nf4 floor", "ms"], ["x_floor", "nf4 x floor", "f2"], ["goal", "goal", "text"]],
     100, kernel_timing),
    ("tile_table", "Tile table (nf4, reduced autotune): fastest tiles per shape, or XLA",
     [["M", "M", None], ["K", "K", None], ["N", "N", None], ["xla_ms", "XLA ms", "ms"], ["best_ms", "best kernel ms", "ms"],
      ["best_tiles", "best tiles", "text"], ["tried", "tried", None], ["failed", "failed", None],
      ["choice", "entry", None]],
     60, tile_table),
    ("attention", "Attention forward + backward (batch 1, causal, bf16)",
     [["length", "tokens", "int"], ["impl", "impl", None], ["ms", "ms", "ms"], ["tflops", "TFLOP/s", "f1"],
      ["temp_gib", "XLA temp GiB", "f2"]],
     40, attention),
    ("train_mfu", "~1B Llama training step: tokens/s and MFU (bf16 compute, AdamW)",
     [["remat", "remat", None], ["attention", "attention", None], ["batch", "batch", None], ["seq", "seq", None],
      ["step_ms", "step ms", "f1"], ["tokens_per_s", "tokens/s", "int"], ["model_tflops", "model TFLOP/s", "f1"],
      ["mfu", "MFU", "pct"], ["first_step_s", "first step s (compile)", "f1"], ["first_loss", "first loss", "f3"],
      ["goal", "goal", "text"]],
     110, train_mfu),
    ("qlora_step", "One-layer Llama-8B QLoRA step (configs/qlora_llama3_8b.yaml): time and peak memory vs estimate",
     [["layers", "layers", None], ["batch", "batch", None], ["seq", "seq", None], ["grad_accum", "accum", None],
      ["remat", "remat", None], ["lora_rank", "LoRA r", None], ["step_ms", "step ms", "f1"],
      ["tokens_per_s", "tokens/s", "int"], ["estimate_gib", "estimate GiB", "f2"],
      ["measured_gib", "measured peak GiB", "f2"], ["xla_gib", "XLA compiled GiB", "f2"],
      ["ratio", "estimate / measured", "f3"], ["goal", "goal", "text"]],
     70, qlora_step),
]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="directory for accelerator_suite.json / .md")
    parser.add_argument("--smoke", action="store_true", help="every section at toy shapes (any backend, Pallas interpreted)")
    parser.add_argument("--budget-s", type=float, default=420.0, help="time budget, checked between sections and rows")
    parser.add_argument("--hard-limit-s", type=float, default=540.0, help="watchdog: write results and exit 0")
    parser.add_argument("--tiles-out", default=None, help="tile table path (default jaxtune/kernels/tiles.json; "
                                                          "--smoke: OUT/tiles.smoke.json)")
    parser.add_argument("--sections", default=",".join(s[0] for s in SECTIONS), help="comma-separated subset")
    parser.add_argument("--mfu-batch", type=int, default=0, help="rows of the ~1B training step (0: 8, smoke 2)")
    parser.add_argument("--rank", type=int, default=0, help="LoRA rank of the kernel sections (0: 16, smoke 8)")
    parser.add_argument("--qlora-child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--go-file", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.qlora_child:
        return qlora_child(Path(args.qlora_child), args.smoke, Path(args.go_file) if args.go_file else None,
                           args.hard_limit_s)
    backend = jax.default_backend()
    if backend == "cpu" and not args.smoke:
        message = (f"accelerator_suite: no accelerator (jax backend {backend!r}, devices {jax.devices()}): nothing "
                   f"measured. On a GPU it would measure {WHAT}. --smoke runs every section at toy shapes here.")
        print(message)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        _write_atomic(out / JSON_NAME, json.dumps({"suite": "accelerator", "accelerator": False, "backend": backend,
                                                   "jax_version": jax.__version__, "message": message}, indent=1) + "\n")
        return 0
    sizes = SMOKE if args.smoke else FULL
    if args.rank:
        sizes = dataclasses.replace(sizes, rank=args.rank)
    suite = Suite(args, sizes)
    wanted = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = set(wanted) - {s[0] for s in SECTIONS}
    if unknown:
        raise SystemExit(f"unknown sections {sorted(unknown)}; known: {', '.join(s[0] for s in SECTIONS)}")
    watchdog = threading.Timer(max(1.0, args.hard_limit_s - (time.monotonic() - suite.t0)), suite.stop_at_hard_limit)
    watchdog.daemon = True
    watchdog.start()
    suite.log(f"accelerator suite on {suite.device_kind} x {jax.device_count()} ({backend}), jax {jax.__version__}, "
              f"budget {args.budget_s:.0f} s{', SMOKE' if args.smoke else ''}")
    numbers = {s[0]: i + 1 for i, s in enumerate(SECTIONS)}
    chosen = [s for s in SECTIONS if s[0] in wanted]
    for key, title, columns, _, _ in chosen:  # listed from the start: a stopped run still shows what it did not do
        suite.data["sections"][key] = {"number": numbers[key], "title": title, "status": "pending", "seconds": None,
                                       "error": None, "columns": columns, "rows": [], "notes": [], "summary": {}}
    try:
        if "qlora_step" in wanted and not args.smoke:  # (on a 2-core CPU the overlap only slows both down)
            try:
                start_qlora_child(suite)
            except Exception as err:  # section 6 tries again and records what fails
                suite.log(f"could not start the QLoRA process: {_error_text(err)}")
        for i, (key, title, columns, share, fn) in enumerate(chosen):
            shares_left = sum(s[3] for s in chosen[i:])
            suite.run(key, numbers[key], title, columns, share, shares_left, lambda sec, fn=fn: fn(sec, suite))
        suite.data["finished"] = True
        record = suite.data["sections"].get("qlora_step")
        if record and record["status"].startswith("skipped") and suite.child_result and suite.child_result.exists():
            record["summary"].update(json.loads(suite.child_result.read_text()))  # the estimate, at least
    finally:
        watchdog.cancel()
        stop_qlora_child(suite)
        suite.flush()
    suite.log(f"done in {time.monotonic() - suite.t0:.0f} s: {suite.out / JSON_NAME}, {suite.out / MD_NAME}")
    try:
        print(markdown(suite.data), flush=True)
    except Exception as err:
        suite.log(f"could not render the Markdown: {_error_text(err)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

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
   output and the gradients dx, dA, dB (benchmarks/qlora_matmul.py ``cases``, every array a jit
   argument, the weights made once per shape); max abs error, error
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

This file is the entry point (arguments, budget, watchdog, the section runner, the files); the sections
are in benchmarks/accelerator/ (``kernels``: 1-3, ``attention``: 4, ``train_mfu``: 5, ``qlora_step``: 6).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import datetime
import json
import os
import platform
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Callable, Optional

START = time.monotonic()  # the budget and the hard limit count from here (JAX's start-up included)
HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for _path in (ROOT, HERE):  # jaxtune; the sections package and the benchmarks they reuse (qlora_matmul, attention)
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))
if __name__ == "__main__" and "--smoke" in sys.argv[1:] and "xla_backend_optimization_level" not in os.environ.get(
        "XLA_FLAGS", ""):
    # toy shapes whose timings mean nothing: compile fast. XLA reads its flags when jax is imported.
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()

import jax  # noqa: E402
import jaxlib  # noqa: E402

from accelerator.attention import attention  # noqa: E402
from accelerator.kernels import kernel_correctness, kernel_timing, tile_table  # noqa: E402
from accelerator.qlora_step import qlora_child, qlora_step, start_qlora_child, stop_qlora_child  # noqa: E402
from accelerator.record import Section, clock, error_text, plain, release_memory, write_atomic  # noqa: E402
from accelerator.report import markdown  # noqa: E402
from accelerator.sizes import FULL, SMOKE, Sizes  # noqa: E402
from accelerator.train_mfu import train_mfu  # noqa: E402

JSON_NAME, MD_NAME = "accelerator_suite.json", "accelerator_suite.md"
WHAT = ("kernel correctness vs XLA (nf4/fp4/int4/int8, forward + dx/dA/dB), kernel timing at Llama-8B projection "
        "shapes (bf16 dense vs XLA dequant vs fused nf4/int8/int4), the tile table (autotune), attention fwd+bwd at "
        "2k/8k tokens (blockwise/flash/cudnn/xla), MFU of a ~1B Llama training step (remat none/full), a one-layer "
        "Llama-8B QLoRA step's time and peak memory vs `jaxtune estimate`")


# --- the run: results, flushing, budget, watchdog ---------------------------------------------------

class Suite:
    """The run: its arguments, sizes, results (``data``, flushed to DIR), the time budget and the watchdog;
    what the sections read: ``smoke``, ``sizes``, ``args``, ``out``, ``device_kind``, ``ctx`` (figures one
    section hands a later one), ``log``; section 6's process: ``child``, ``child_result``, ``child_go``."""

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
        print(f"[{clock()} +{time.monotonic() - self.t0:6.1f}s] {message}", file=sys.stderr, flush=True)

    def flush(self) -> None:
        """Both files, now; a failure to write one is reported on stderr, never raised."""
        with self.lock:
            self.data["elapsed_s"] = round(time.monotonic() - self.t0, 1)
            for name, render in ((JSON_NAME, lambda: json.dumps(plain(self.data), indent=1) + "\n"),
                                 (MD_NAME, lambda: markdown(self.data))):
                try:
                    self.out.mkdir(parents=True, exist_ok=True)
                    write_atomic(self.out / name, render())
                except Exception as err:
                    self.log(f"could not write {name}: {error_text(err)[:300]}")

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
            section.record["error"] = error_text(err)
            section.record["traceback"] = traceback.format_exc()[-4000:]
            self.log(f"section {number} ({key}): ERROR {error_text(err)[:300]}")
        section.record["seconds"] = round(time.monotonic() - start, 1)
        self.current = None
        self.log(f"section {number} ({key}): {section.record['status']} in {section.record['seconds']} s")
        self.flush()
        release_memory()

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


def _platform_version() -> Optional[str]:
    try:
        return str(jax.devices()[0].client.platform_version)
    except Exception:
        return None


def _jaxlib_version() -> Optional[str]:
    try:
        return jaxlib.__version__
    except Exception:
        return None


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
        write_atomic(out / JSON_NAME, json.dumps({"suite": "accelerator", "accelerator": False, "backend": backend,
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
                suite.log(f"could not start the QLoRA process: {error_text(err)}")
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
        suite.log(f"could not render the Markdown: {error_text(err)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

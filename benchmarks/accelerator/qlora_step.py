"""Section 6: a one-layer Llama-8B QLoRA step (configs/qlora_llama3_8b.yaml) in a fresh process, its
peak memory its own: step time, measured peak, XLA's compiled peak and `jaxtune estimate`'s figure.

The process is benchmarks/accelerator_suite.py again, with ``--qlora-child RESULT --go-file GO``: it
plans, estimates and compiles, writes RESULT, then waits for GO before it allocates anything and runs.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Optional

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxtune.config import load_config
from jaxtune.kernels import tiles as table
from jaxtune.models import ModelConfig
from jaxtune.models.presets import preset
from jaxtune.parallel.mesh import BATCH_AXES
from jaxtune.train.memory import estimate
from jaxtune.train.step import TrainState, make_train_step, named

from accelerator.record import GiB, Section, clock, error_text, memory_stats, plain, write_atomic
from accelerator.sizes import FULL, SMOKE

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "accelerator_suite.py"  # the entry point, run again as section 6's process


def start_qlora_child(suite) -> None:
    """Start section 6's process now: it plans, estimates and compiles (CPU work, mostly) while the
    other sections run, then waits for the go file before it allocates anything or runs a step."""
    suite.child_result = suite.out / "qlora_step.child.json"
    suite.child_go = suite.out / "qlora_step.go"
    for path in (suite.child_result, suite.child_go):
        if path.exists():
            path.unlink()
    suite.out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(SCRIPT), "--out", str(suite.out), "--qlora-child",
           str(suite.child_result), "--go-file", str(suite.child_go),
           "--hard-limit-s", str(max(30.0, suite.args.hard_limit_s - (time.monotonic() - suite.t0)))]
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


def stop_qlora_child(suite) -> None:
    if suite.child is not None and suite.child.poll() is None:
        suite.child.kill()
        suite.child.wait()
    suite.child = None
    if suite.child_go is not None and suite.child_go.exists():
        suite.child_go.unlink()


def qlora_step(sec: Section, suite) -> None:
    early = suite.child.poll() if suite.child is not None else None
    if early not in (None, 0):  # the process started early failed: once more, alone on the machine
        sec.note(f"the QLoRA process started early exited with {early} "
                 f"({' / '.join(list(suite.child_tail)[-3:])[:400]}); starting it again")
        suite.child = None
    if suite.child is None:
        start_qlora_child(suite)
    suite.child_go.write_text("go\n")
    timeout = max(15.0, sec.remaining() + 30.0)
    timeout = min(timeout, max(15.0, suite.args.hard_limit_s - (time.monotonic() - suite.t0) - 15.0))
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
    # here, not at the top: jaxtune.job imports orbax, whose absl logging calls logging.basicConfig() on
    # import; in the suite's process that would print (besides recording) every warning jaxtune logs
    from jaxtune.job import TrainJobConfig, plan_step

    sizes = SMOKE if smoke else FULL
    out: dict = {}
    save = lambda: write_atomic(path, json.dumps(plain(out), indent=1) + "\n")  # noqa: E731

    def log(message):
        out["phase"] = message
        print(f"[{clock()}] qlora child: {message}", file=sys.stderr, flush=True)
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
        out["memory_before"] = memory_stats()
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
            out["xla_note"] = f"memory_analysis unavailable: {error_text(err)[:200]}"
        out["memory_after_compile"] = memory_stats()
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
        out["memory_after_init"] = memory_stats()
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
        stats = memory_stats()
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
        out["error"] = error_text(err)
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

"""`jaxtune estimate [CONFIG] [key=value ...] [--devices N] [--compiled]`: per-device memory of a
training job's step (params, trainable, gradients, optimizer state, activations, peak) for its
model, method (full / LoRA / QLoRA ...), remat policy, batch, sequence length and mesh, without
allocating any of it; ``--compiled`` also compiles the real step with abstract inputs and prints
XLA's own figure. Also the exact parameter count and the KV cache of generation."""

from __future__ import annotations

import jax
import numpy as np

from jaxtune.cli.args import split_config_args
from jaxtune.config import load_config
from jaxtune.job import TrainJobConfig, plan_step
from jaxtune.job.lowering import lower_job
from jaxtune.train.memory import compiled, estimate, longest_context
from jaxtune.utils.partition import count


def add_parser(sub) -> None:
    p = sub.add_parser("estimate", help="per-device memory of a training step (and XLA's figure), without allocating")
    p.add_argument("args", nargs="*", help="[CONFIG.yaml] key=value ...  (a training config: model, peft, train, mesh)")
    p.add_argument("--devices", type=int, default=None,
                   help="devices the mesh spans (default: this machine's); --compiled needs that many")
    p.add_argument("--compiled", action="store_true", help="also compile the step abstractly and print XLA's memory analysis")
    p.add_argument("--max-context", type=float, nargs="+", metavar="GIB", default=None,
                   help="also the longest train.seq_len whose estimated peak fits each budget (GiB per device)")
    p.add_argument("--lower", default=None, metavar="PLATFORMS",
                   help="also lower the train, eval and decode programs for these platforms (e.g. cuda,tpu; no "
                        "accelerator needed) and list the fused kernels each contains; --devices fake CPU devices "
                        "(XLA_FLAGS=--xla_force_host_platform_device_count=N) stand in for the mesh")
    p.add_argument("--batch", type=int, default=1, help="KV cache line: generation batch")
    p.add_argument("--seq", type=int, default=None, help="KV cache line: tokens (default train.seq_len)")
    p.set_defaults(func=run)


def _gib(n: float) -> str:
    return f"{n / 2**30:10.3f} GiB"


def run(args) -> int:
    config_path, overrides = split_config_args(args.args)
    job = load_config(TrainJobConfig, config_path, overrides)
    plan = plan_step(job, devices=args.devices)
    cfg, t = plan.cfg, job.train
    method = "full fine-tune" if not job.peft.active and t.trainable is None else "PEFT / partial"
    if job.model.quant is not None:
        method += f" over {job.model.quant.kind} kernels"
    mesh = " x ".join(f"{k}={v}" for k, v in plan.mesh_shape.items())
    print(f"model        {cfg.family}, {cfg.num_layers} layers, hidden {cfg.hidden_size}, vocab {cfg.vocab_size}")
    print(f"parameters   {count(plan.params):,} ({count(plan.trainable):,} trainable; {method})")
    print(f"step         batch {t.batch_size} x seq {t.seq_len}, grad_accum {t.grad_accum}, remat {t.remat}, "
          f"optimizer {job.optim.name}, mesh {mesh}")
    print("per device (estimate):")
    est = estimate(plan)
    for name, value in est.rows():
        print(f"  {name:34s}{_gib(value)}")
    seq = args.seq or t.seq_len
    kv = 2 * cfg.num_layers * args.batch * seq * cfg.num_kv_heads * cfg.head_dim * np.dtype(cfg.dtype).itemsize
    print(f"KV cache (generation, batch {args.batch} x {seq} tokens, {cfg.dtype}): {_gib(kv).strip()}")
    if args.max_context:
        _print_max_context(plan, args.max_context, job)
    if args.lower:
        _print_lowered(job, args)
    if args.compiled:
        xla = compiled(plan)
        print(f"per device (XLA memory_analysis of the compiled step, {jax.devices()[0].platform}):")
        for name in ("arguments", "outputs", "aliased", "temporaries", "peak"):
            print(f"  {name:34s}{_gib(xla[name])}")
        print(f"  estimate / compiler peak          {est.peak / xla['peak']:10.3f}")
    return 0


def _print_lowered(job, args) -> None:
    platforms = tuple(p.strip() for p in args.lower.split(",") if p.strip())
    print(f"lowered (no compile) on a mesh of {jax.device_count()} {jax.devices()[0].platform} devices:")
    for lowered in lower_job(job, platforms, devices=args.devices):
        kernels = ", ".join(f"{name} x{n}" for name, n in sorted(lowered.kernels.items())) or "no custom calls (XLA only)"
        print(f"  {lowered.program:7s}{lowered.platform:6s}{kernels}")


def _print_max_context(plan, budgets: list[float], job) -> None:
    t, cfg = job.train, plan.cfg
    multiple = 128 * plan.mesh_shape.get("context", 1)
    # learned positions have no row past the table; rotary ones run on (quality is the model's business)
    limit = cfg.max_position_embeddings if cfg.position == "learned" else 1 << 24
    print(f"longest context (train.seq_len, a multiple of {multiple}) whose estimated peak fits; batch {t.batch_size}, "
          f"remat {t.remat}, mlp_chunk_tokens {t.mlp_chunk_tokens}, loss_chunk_tokens {t.loss_chunk_tokens}, "
          f"attention {cfg.attention_impl}:")
    print(f"  {'budget':>12s} {'tokens':>11s} {'peak':>14s} {'host (offload)':>16s}")
    found = longest_context(plan, [int(b * 2**30) for b in budgets], multiple, limit)
    for budget, (length, est) in zip(budgets, found):
        if est is None:
            print(f"  {budget:8g} GiB {'none':>11s}   (not even {multiple} tokens fit)")
            continue
        note = ""
        if length > cfg.max_position_embeddings:
            note = f"  (past max_position_embeddings {cfg.max_position_embeddings})"
        if length == limit // multiple * multiple:
            note += "  (the search's limit)"
        print(f"  {budget:8g} GiB {length:>11,d} {_gib(est.peak)} {_gib(est.host):>16s}{note}")

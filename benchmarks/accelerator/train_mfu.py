"""Section 5: a ~1B Llama training step's tokens/s and MFU, remat none and full."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxtune.models import Model, ModelConfig
from jaxtune.train.losses import causal_lm_loss
from jaxtune.train.metrics import device_peak_flops, model_flops_per_token
from jaxtune.train.optim import OptimConfig, build_optimizer
from jaxtune.train.step import TrainState, make_train_step

import qlora_matmul as qm  # benchmarks/qlora_matmul.py
from accelerator.record import Section, error_text, is_oom, release_memory


def train_mfu(sec: Section, suite) -> None:
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
                           z.train_repeats)
                break
            except Exception as err:
                release_memory()
                if attempt < 2 and is_oom(err) and rows > 1:
                    sec.note(f"remat {remat}: out of memory at batch {rows}; retrying at {rows // 2}")
                    rows //= 2
                    continue
                if attempt < 2 and attn != "blockwise":  # the kernel's failure should not cost the MFU figure
                    sec.note(f"remat {remat}: attention {attn} failed ({error_text(err)[:300]}); retrying with "
                             "blockwise attention")
                    attn = "blockwise"
                    continue
                row["error"] = error_text(err)
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


def _train_row(row, cfg, params, opt, schedule, rows, seq, repeats) -> None:
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

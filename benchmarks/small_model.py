"""The Quickstart's model, jaxtune vs PyTorch eager, side by side on this CPU.

    python benchmarks/small_model.py [--steps 200] [--steps-per-call 1,10] [--walls]

Model: nanoGPT's character-level Shakespeare GPT as `GPT2LMHeadModel` (vocab 65, 4 layers, 4 heads,
128 wide, context 64, exact GELU, dropout 0, tied embeddings; GPT-2 keeps its biases), made by
transformers with random weights and loaded into jaxtune, so both sides train identical weights on
identical batches (random windows of tiny Shakespeare, batch 12 x 64). One step = forward,
backward, global-norm clip 1.0, AdamW (lr 1e-3, betas 0.9 / 0.99, weight decay 0.1), fp32.

Reported, per step (median over windows of --steps steps after warm-up):
- PyTorch eager with 2 threads (the nanoGPT CPU setting), the loss read back every step;
- jaxtune's jitted step called once per step (``steps_per_call=1``: one dispatch and one metrics
  fetch per step) and with several steps per call (a `lax.scan` over stacked batches);
- jaxtune's whole loop (`jaxtune.train.loop.train`: data placement, metrics, logging to JSONL) at
  each steps-per-call, from its own wall clock minus the first call (compilation);
and the first-step losses of both sides (same weights and batch: they agree).

--walls also runs the two configs as a user would (``jaxtune train`` in a subprocess, wall clock
of the command) and PyTorch through nanoGPT's recipe (2000 iterations, lr 1e-3 cosine to 1e-4,
warmup 100, evaluating the held-out 10% at the end), and prints val loss and wall for each.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers

from jaxtune.data.source_base import resolve_path
from jaxtune.interop import load_hf
from jaxtune.models import Model
from jaxtune.train.config import LoggingConfig, TrainConfig
from jaxtune.train.loop import train
from jaxtune.train.losses import causal_lm_loss
from jaxtune.train.optim import OptimConfig, build_optimizer
from jaxtune.train.step import TrainState, make_train_step
from jaxtune.parallel.mesh import MeshConfig, make_mesh

BATCH, CONTEXT = 12, 64
REPO = Path(__file__).resolve().parent.parent


def corpus() -> tuple[np.ndarray, np.ndarray, int]:
    """tiny Shakespeare as character ids (sorted distinct characters, as the char tokenizer does),
    split 90 / 10 into train and held-out."""
    text = Path(resolve_path("builtin:tinyshakespeare.txt")).read_text()
    chars = sorted(set(text))
    lookup = np.zeros(max(map(ord, chars)) + 1, np.int32)
    lookup[[ord(c) for c in chars]] = np.arange(len(chars))
    ids = lookup[np.frombuffer(text.encode("utf-32-le"), np.uint32)]
    split = int(len(ids) * 0.9)
    return ids[:split], ids[split:], len(chars)


def windows(ids: np.ndarray, n: int, seed: int) -> np.ndarray:
    """[n, BATCH, CONTEXT + 1] random windows (nanoGPT's get_batch)."""
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, len(ids) - CONTEXT - 1, (n, BATCH))
    return ids[starts[..., None] + np.arange(CONTEXT + 1)].astype(np.int32)


def hf_model(vocab: int) -> transformers.GPT2LMHeadModel:
    config = transformers.GPT2Config(vocab_size=vocab, n_positions=CONTEXT, n_embd=128, n_layer=4, n_head=4,
                                     activation_function="gelu", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                     tie_word_embeddings=True)
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config)


def lm_batch(tokens: np.ndarray) -> dict:
    """[..., CONTEXT + 1] windows -> jaxtune's batch dict (leading axes kept)."""
    shape = tokens[..., :-1].shape
    return {"tokens": tokens[..., :-1], "targets": tokens[..., 1:], "segment_ids": np.ones(shape, np.int32),
            "loss_mask": np.ones(shape, np.float32)}


def optimizer(steps: int, lr: float = 1e-3, warmup: int = 0, schedule: str = "constant"):
    return build_optimizer(OptimConfig(lr=lr, b2=0.99, weight_decay=0.1, clip_norm=1.0, warmup_steps=warmup,
                                       schedule=schedule, final_lr_ratio=0.1), steps)


def torch_steps(model, data: np.ndarray, lr_at=lambda i: 1e-3) -> tuple[list[float], list[float]]:
    """Train on each [BATCH, CONTEXT + 1] window of ``data``; -> (seconds per step, losses)."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr_at(0), betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
    model.train()
    times, losses = [], []
    for i, window in enumerate(data):
        start = time.perf_counter()
        for group in opt.param_groups:
            group["lr"] = lr_at(i)
        x = torch.from_numpy(window[:, :-1]).long()
        y = torch.from_numpy(window[:, 1:]).long()
        logits = model(x).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())  # nanoGPT reads the loss back every iteration too
        times.append(time.perf_counter() - start)
    return times, losses


def jax_step_times(params, cfg, data: np.ndarray, per_call: int) -> tuple[list[float], float, float]:
    """The jitted step alone: -> (seconds per step of each call after the first, first call s, first loss)."""
    opt, schedule = optimizer(len(data))
    step = make_train_step(causal_lm_loss(Model(cfg)), opt, schedule, steps_per_call=per_call)
    state = TrainState.create(params, opt, jax.random.key(0))
    times, first_s, first_loss = [], 0.0, 0.0
    for i in range(0, len(data) - per_call + 1, per_call):
        batch = {k: jnp.asarray(v) for k, v in lm_batch(data[i:i + per_call] if per_call > 1 else data[i]).items()}
        start = time.perf_counter()
        state, metrics = step(state, None, batch)
        loss = np.asarray(jax.device_get(metrics["loss"])).reshape(-1)
        elapsed = time.perf_counter() - start
        if i == 0:
            first_s, first_loss = elapsed, float(loss[0])
        else:
            times.append(elapsed / per_call)
    return times, first_s, first_loss


class Windows:
    """A stream of the benchmark's batches for the loop."""

    def __init__(self, data):
        self.data, self.i = data, 0

    def __iter__(self):
        return self

    def __next__(self):
        batch = lm_batch(self.data[self.i % len(self.data)])
        self.i += 1
        return batch


def loop_step_time(params, cfg, data: np.ndarray, per_call: int, log_dir: str) -> float:
    """Seconds per step of the whole loop (JSONL logging every step's window of 100, no
    checkpoints), excluding the first call (compilation): from the loop's own metrics."""
    opt, schedule = optimizer(len(data))
    mesh = make_mesh(MeshConfig())
    start = time.perf_counter()
    result = train(loss_fn=causal_lm_loss(Model(cfg)), params=params, model_cfg=cfg, optimizer=opt,
                   schedule=schedule, cfg=TrainConfig(steps=len(data), batch_size=BATCH, seq_len=CONTEXT,
                                                      log_every=100, eval_every=0, steps_per_call=per_call),
                   batches=Windows(data), mesh=mesh,
                   logging=LoggingConfig(progress=True, tensorboard=False, jsonl=True), log_dir=log_dir)
    total = time.perf_counter() - start
    return (total - result.first_step_s) / (len(data) - per_call)


def run_config(config: str, out: str) -> tuple[float, float]:
    """``jaxtune train CONFIG`` as a user runs it: -> (wall s, last held-out loss)."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "jaxtune.cli.main", "train", config, f"checkpoint.directory={out}",
                    "logging.progress=false"], check=True, cwd=REPO, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    evals = [json.loads(line) for line in open(Path(out) / "metrics.jsonl") if '"eval/loss"' in line]
    return wall, evals[-1]["eval/loss"]


def torch_nanogpt_recipe(vocab: int, train_ids: np.ndarray, val_ids: np.ndarray) -> tuple[float, float]:
    """nanoGPT's CPU recipe in PyTorch eager: 2000 iterations, lr 1e-3 with 100 warmup steps and
    cosine decay to 1e-4, then the loss over the whole held-out split. -> (wall s, val loss)."""
    steps, warmup, peak, floor = 2000, 100, 1e-3, 1e-4

    def lr_at(i):
        if i < warmup:
            return peak * (i + 1) / warmup
        ratio = (i - warmup) / (steps - warmup)
        return floor + 0.5 * (1 + math.cos(math.pi * ratio)) * (peak - floor)

    model = hf_model(vocab)
    start = time.perf_counter()
    torch_steps(model, windows(train_ids, steps, seed=1), lr_at)
    model.eval()
    n = (len(val_ids) - 1) // CONTEXT
    x = torch.from_numpy(val_ids[:n * CONTEXT].reshape(n, CONTEXT)).long()
    y = torch.from_numpy(val_ids[1:n * CONTEXT + 1].reshape(n, CONTEXT)).long()
    total = 0.0
    with torch.no_grad():
        for i in range(0, n, 256):
            logits = model(x[i:i + 256]).logits
            total += torch.nn.functional.cross_entropy(logits.reshape(-1, vocab), y[i:i + 256].reshape(-1),
                                                       reduction="sum").item()
    return time.perf_counter() - start, total / (n * CONTEXT)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200, help="timed steps per variant")
    parser.add_argument("--steps-per-call", default="1,10", help="jaxtune variants: optimizer steps per jitted call")
    parser.add_argument("--walls", action="store_true", help="also time the two configs and PyTorch's nanoGPT recipe end to end")
    args = parser.parse_args()
    jax.config.update("jax_default_matmul_precision", "highest")
    torch.set_num_threads(2)
    train_ids, val_ids, vocab = corpus()
    model = hf_model(vocab)
    with tempfile.TemporaryDirectory() as directory:
        model.save_pretrained(directory)
        params, cfg = load_hf(directory)
    data = windows(train_ids, args.steps + 10, seed=0)
    print(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), transformers {transformers.__version__}")
    print(f"model: GPT-2 shaped, vocab {vocab}, 4 layers x 128, context {CONTEXT}, batch {BATCH}, "
          f"{sum(p.numel() for p in model.parameters()):,} params, AdamW fp32; medians over {args.steps} steps")
    torch_times, torch_losses = torch_steps(model, data)
    torch_s = statistics.median(torch_times[10:])
    print(f"{'PyTorch eager (2 threads)':38s} {torch_s * 1e3:7.2f} ms/step  first loss {torch_losses[0]:.5f}")
    for per_call in [int(k) for k in args.steps_per_call.split(",")]:
        times, first_s, first_loss = jax_step_times(params, cfg, data, per_call)
        s = statistics.median(times)
        print(f"{f'jaxtune jitted step, {per_call} per call':38s} {s * 1e3:7.2f} ms/step  first loss {first_loss:.5f}"
              f"  first call {first_s:.2f} s  ratio {torch_s / s:.2f}x")
    for per_call in [int(k) for k in args.steps_per_call.split(",")]:
        with tempfile.TemporaryDirectory() as log_dir:
            s = loop_step_time(params, cfg, data, per_call, log_dir)
        print(f"{f'jaxtune whole loop, {per_call} per call':38s} {s * 1e3:7.2f} ms/step"
              f"{'':33s}ratio {torch_s / s:.2f}x")
    if args.walls:
        wall, val = torch_nanogpt_recipe(vocab, train_ids, val_ids)
        print(f"{'PyTorch eager, nanoGPT recipe 2000 it':38s} wall {wall:6.1f} s  val {val:.4f}")
        for config in ("configs/pretrain_shakespeare_char.yaml", "configs/pretrain_shakespeare_char_speedrun.yaml"):
            with tempfile.TemporaryDirectory() as out:
                run_wall, run_val = run_config(config, os.path.join(out, "run"))
            print(f"{'jaxtune train ' + Path(config).stem:38s} wall {run_wall:6.1f} s  val {run_val:.4f}  "
                  f"({run_wall / wall:.2f}x PyTorch's wall)")


if __name__ == "__main__":
    main()

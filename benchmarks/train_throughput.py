"""Training tokens/s: jaxtune's train step vs transformers + PyTorch, same weights, same CPU, one run.

    python benchmarks/train_throughput.py [--batch 8] [--seq 256] [--repeats 10] [--variants default,chunked]

Model: the `bench-llama-31m` preset (vocab 8192, hidden 512, 8 layers, 8 heads,
2 KV heads, FFN 1408; 31 M params), created by transformers with random
weights and loaded into jaxtune, so both sides train identical weights.
One step = forward, backward, global-norm clip 1.0, AdamW (lr 1e-4, wd 0.1),
fp32 everywhere, every token a target. PyTorch runs with as many threads as
the machine has cores. Reported: median of --repeats steps after two warm-up
steps, jaxtune's first-step time (compilation included), the ratio, the loss
of the first step on both sides (same weights and batch: they must agree), and
achieved model GFLOP/s (6 N + attention per token) against the fp32 GEMM rate
of each library on this model's own matmul shapes.

jaxtune variants: default (the loop's defaults: attention_impl=auto, which is blockwise
attention on CPU), dpa and xla_attn (the dense attention paths: jax.nn.dot_product_attention,
heads-major grouped einsum), chunked (default + loss logits built 512 tokens at a time), remat
(default + full block remat). --block sets blockwise attention's tiles (0: the model's default).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers

from forward_throughput import median_seconds  # benchmarks/ is on sys.path when run as a script
from jaxtune.interop import load_hf
from jaxtune.interop.hf_config import to_hf_config
from jaxtune.models import Model
from jaxtune.models.presets import preset
from jaxtune.train.losses import causal_lm_loss
from jaxtune.train.metrics import model_flops_per_token
from jaxtune.train.optim import OptimConfig, build_optimizer
from jaxtune.train.step import TrainState, make_train_step

VARIANTS = {
    "default": dict(remat="none", chunk=0, attention="auto"),
    "dpa": dict(remat="none", chunk=0, attention="dpa"),
    "xla_attn": dict(remat="none", chunk=0, attention="xla"),
    "chunked": dict(remat="none", chunk=512, attention="auto"),
    "remat": dict(remat="full", chunk=0, attention="auto"),
}


def jax_side(params, cfg, batch, variant, repeats, block=0):
    opt, schedule = build_optimizer(OptimConfig(lr=1e-4, weight_decay=0.1, clip_norm=1.0, schedule="constant",
                                                decay_embeddings=True, decay_norms=True), 100)
    cfg = cfg.replace(remat=variant["remat"], attention_impl=variant["attention"])
    if block:
        cfg = cfg.replace(attention_block_q=block, attention_block_kv=block)
    model = Model(cfg)
    step = make_train_step(causal_lm_loss(model, chunk_tokens=variant["chunk"]), opt, schedule)
    return time_steps(step, TrainState.create(params, opt, jax.random.key(0)), batch, repeats)


def time_steps(step, state, batch, repeats):
    """-> (median seconds of a step after two warm-up steps, the first step's seconds with compilation,
    the first step's loss) of a jitted ``step(state, None, batch)``."""
    start = time.perf_counter()
    state, metrics = step(state, None, batch)
    first_loss = float(metrics["loss"])
    first_s = time.perf_counter() - start
    state, _ = step(state, None, batch)
    jax.block_until_ready(state)
    holder = {"state": state}

    def one():
        holder["state"], _ = step(holder["state"], None, batch)
        jax.block_until_ready(holder["state"])

    return median_seconds(one, repeats), first_s, first_loss


def torch_side(model, tokens, repeats):
    model.train()
    # HF's AdamW setup in Trainer: no decay for biases and norms; here all params decay as on the jax side.
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    ids = torch.tensor(tokens[:, :-1], dtype=torch.long)
    labels = torch.tensor(tokens[:, 1:], dtype=torch.long)

    def loss():
        logits = model(ids).logits
        return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))

    return time_torch_steps(model, opt, loss, repeats)


def time_torch_steps(model, opt, loss_fn, repeats):
    """-> (median seconds of a step after two warm-up steps, the first step's loss): zero grads,
    ``loss_fn()``, backward, global-norm clip 1.0, ``opt.step()``."""

    def one():
        opt.zero_grad(set_to_none=True)
        loss = loss_fn()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return float(loss.detach())

    first_loss = one()
    one()
    return median_seconds(one, repeats), first_loss


def gemm_rates(cfg, rows, repeats):
    """fp32 GFLOP/s of XLA and PyTorch over this model's forward GEMM shapes (the backward runs the same sizes)."""
    shapes = [(rows, cfg.hidden_size, cfg.intermediate_size), (rows, cfg.intermediate_size, cfg.hidden_size),
              (rows, cfg.hidden_size, cfg.hidden_size), (rows, cfg.hidden_size, cfg.vocab_size)]
    matmul = jax.jit(jnp.matmul)
    xla_t = torch_t = flops = 0.0
    for m, k, n in shapes:
        a = np.random.default_rng(1).random((m, k), np.float32)
        b = np.random.default_rng(2).random((k, n), np.float32)
        ja, jb = jnp.asarray(a), jnp.asarray(b)
        matmul(ja, jb).block_until_ready()
        xla_t += median_seconds(lambda: matmul(ja, jb).block_until_ready(), repeats)
        ta, tb = torch.from_numpy(a), torch.from_numpy(b)
        torch_t += median_seconds(lambda: ta @ tb, repeats)
        flops += 2 * m * k * n
    return flops / xla_t / 1e9, flops / torch_t / 1e9


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--variants", default="default,dpa,xla_attn,chunked,remat")
    parser.add_argument("--block", type=int, default=0, help="blockwise attention tiles (0: the model's default)")
    args = parser.parse_args()
    jax.config.update("jax_default_matmul_precision", "highest")  # true fp32 on every backend
    torch.set_num_threads(os.cpu_count())
    cfg = preset("bench-llama-31m")
    hf_config = transformers.AutoConfig.for_model(**{k: v for k, v in to_hf_config(cfg).items() if k != "architectures"})
    torch.manual_seed(0)
    torch_model = transformers.AutoModelForCausalLM.from_config(hf_config)
    with tempfile.TemporaryDirectory() as directory:
        torch_model.save_pretrained(directory)
        params, cfg = load_hf(directory)
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (args.batch, args.seq + 1)).astype(np.int32)
    batch = {
        "tokens": jnp.asarray(tokens[:, :-1]), "targets": jnp.asarray(tokens[:, 1:]),
        "segment_ids": jnp.ones((args.batch, args.seq), jnp.int32), "loss_mask": jnp.ones((args.batch, args.seq), jnp.float32),
    }
    n_tokens = args.batch * args.seq
    flops_per_token = model_flops_per_token(cfg, args.seq)

    print(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), transformers {transformers.__version__}")
    print(f"model: bench-llama-31m ({sum(p.numel() for p in torch_model.parameters()) / 1e6:.1f} M params), "
          f"batch {args.batch} x {args.seq} tokens, AdamW, fp32, median of {args.repeats} steps")
    torch_s, torch_loss = torch_side(torch_model, tokens, args.repeats)
    results = {}
    for name in args.variants.split(","):
        results[name] = jax_side(params, cfg, batch, VARIANTS[name], args.repeats, args.block)
    xla_rate, torch_rate = gemm_rates(cfg, n_tokens, args.repeats)
    gflops = lambda s: flops_per_token * n_tokens / s / 1e9  # noqa: E731
    print(f"transformers       {n_tokens / torch_s:8.0f} tokens/s  {torch_s * 1e3:7.1f} ms/step  "
          f"{gflops(torch_s):5.0f} GFLOP/s = {gflops(torch_s) / torch_rate:4.0%} of PyTorch GEMM rate  first loss {torch_loss:.5f}")
    for name, (s, first_s, loss) in results.items():
        print(f"jaxtune {name:10s} {n_tokens / s:8.0f} tokens/s  {s * 1e3:7.1f} ms/step  "
              f"{gflops(s):5.0f} GFLOP/s = {gflops(s) / xla_rate:4.0%} of XLA GEMM rate  first loss {loss:.5f}  "
              f"first step incl. compile {first_s:.2f} s  ratio {torch_s / s:.2f}x")
    print(f"fp32 GEMM rate on the model's shapes: XLA {xla_rate:.0f} GFLOP/s, PyTorch {torch_rate:.0f} GFLOP/s")


if __name__ == "__main__":
    main()

"""Forward (inference) tokens/s: jaxtune vs transformers (PyTorch), same weights, same CPU, one run.

    python benchmarks/forward_throughput.py [--batch 8] [--seq 256] [--repeats 10]

The model is the `bench-llama-31m` preset (vocab 8192, hidden 512, 8 layers,
8 heads, 2 KV heads, FFN 1408), created with transformers, saved with
save_pretrained and loaded into jaxtune, so both sides run identical weights.
Both produce full fp32 logits. PyTorch uses as many threads as this machine
has cores (torch.get_num_threads after set_num_threads(os.cpu_count())).
Reports the median of --repeats timed calls after warm-up, the jaxtune compile
time, the ratio, and the max logit difference as a sanity check; then the raw
fp32 matmul throughput of XLA and PyTorch on the model's own GEMM shapes, which
bounds what either side can reach.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers

from jaxtune.interop import load_hf
from jaxtune.interop.hf_config import to_hf_config
from jaxtune.models import Model
from jaxtune.models.presets import preset


def median_seconds(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count())
    cfg = preset("bench-llama-31m")
    hf_config = transformers.AutoConfig.for_model(**{k: v for k, v in to_hf_config(cfg).items() if k != "architectures"})
    torch.manual_seed(0)
    torch_model = transformers.AutoModelForCausalLM.from_config(hf_config).eval()
    with tempfile.TemporaryDirectory() as directory:
        torch_model.save_pretrained(directory)
        params, cfg = load_hf(directory)
    model = Model(cfg)
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (args.batch, args.seq)).astype(np.int32)
    n_tokens = args.batch * args.seq

    forward = jax.jit(model.apply)
    jax_tokens = jnp.asarray(tokens)
    start = time.perf_counter()
    ours = forward(params, jax_tokens).block_until_ready()
    compile_s = time.perf_counter() - start
    jax_s = median_seconds(lambda: forward(params, jax_tokens).block_until_ready(), args.repeats)

    torch_tokens = torch.tensor(tokens, dtype=torch.long)
    with torch.inference_mode():
        ref = torch_model(torch_tokens).logits
        torch_s = median_seconds(lambda: torch_model(torch_tokens).logits, args.repeats)

    diff = float(np.abs(np.asarray(ours) - ref.numpy()).max())
    print(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), transformers {transformers.__version__}")
    print(f"model: bench-llama-31m ({sum(p.numel() for p in torch_model.parameters()) / 1e6:.1f} M params), "
          f"batch {args.batch} x {args.seq} tokens, fp32, median of {args.repeats}")
    print(f"jaxtune      {n_tokens / jax_s:10.0f} tokens/s  ({jax_s * 1e3:.1f} ms/step, first call incl. compile {compile_s:.2f} s)")
    print(f"transformers {n_tokens / torch_s:10.0f} tokens/s  ({torch_s * 1e3:.1f} ms/step)")
    print(f"ratio jaxtune / transformers: {torch_s / jax_s:.2f}x   max |logit diff| {diff:.2e}")
    matmul_floor(cfg, n_tokens, args.repeats)


def matmul_floor(cfg, rows, repeats):
    """fp32 GEMM GFLOP/s of XLA and PyTorch on the shapes this model's forward runs."""
    shapes = [(rows, cfg.hidden_size, cfg.intermediate_size), (rows, cfg.intermediate_size, cfg.hidden_size),
              (rows, cfg.hidden_size, cfg.vocab_size)]
    matmul = jax.jit(jnp.matmul)
    for m, k, n in shapes:
        a = np.random.default_rng(1).random((m, k), np.float32)
        b = np.random.default_rng(2).random((k, n), np.float32)
        ja, jb = jnp.asarray(a), jnp.asarray(b)
        matmul(ja, jb).block_until_ready()
        xla_s = median_seconds(lambda: matmul(ja, jb).block_until_ready(), repeats)
        ta, tb = torch.from_numpy(a), torch.from_numpy(b)
        torch_s = median_seconds(lambda: ta @ tb, repeats)
        flops = 2 * m * k * n / 1e9
        print(f"matmul {m}x{k}x{n}: XLA {flops / xla_s:6.0f} GFLOP/s, PyTorch {flops / torch_s:6.0f} GFLOP/s")


if __name__ == "__main__":
    main()

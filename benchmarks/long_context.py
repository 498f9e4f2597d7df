"""Longest context of Llama-3.1-8B QLoRA per GPU memory size, next to Unsloth's published table.

    python benchmarks/long_context.py [--budgets 8,12,16,24,40,48,80] [--check]

The setting of Unsloth's README: Llama 3.1 8B, 4-bit QLoRA on all seven projections, rank 32,
batch 1, sequences padded to the length. For each jaxtune setting below the job's step is planned
abstractly (no weights, no allocation; `jaxtune.job.plan_step`) and `jaxtune.train.memory.
longest_context` searches the estimate for the longest sequence whose per-device peak fits each
budget (GPU memory taken as GiB: an "80 GB" H100 has 79.6 GiB, a "24 GB" card 24.0). The same as
``jaxtune estimate configs/qlora_llama3_8b.yaml model.hf_dir=null model.preset=llama-3.1-8b
peft.lora.rank=32 train.batch_size=1 train.grad_accum=1 train.remat=offload
train.mlp_chunk_tokens=1024 train.loss_chunk_tokens=256 --max-context 8 12 16 24 40 48 80``.
Also the 8,192-token peak under the recipe's own settings (remat full, loss chunk 2048, no MLP
chunking) and under the long-context ones.

--check also compiles the step of a small Llama (2 layers x 256, QLoRA, float32) at 8,192 and
16,384 tokens on this CPU and prints the estimate next to XLA's memory analysis (remat none: XLA:CPU
removes rematerialisation's barriers before CSE, so its figures for remat full / offload equal
remat none's; see the README).
"""

from __future__ import annotations

import argparse
import time

from jaxtune.config import from_dict, load_config
from jaxtune.job import TrainJobConfig, plan_step
from jaxtune.train.memory import compiled, estimate, longest_context

PUBLISHED = {  # Unsloth README, Llama 3.1 8B QLoRA r32 batch 1: longest context per GPU memory (GB)
    "Unsloth": {8: 2972, 12: 21848, 16: 40724, 24: 78475, 40: 153977, 48: 191728, 80: 342733},
    "Hugging Face + FA2": {8: None, 12: 932, 16: 2551, 24: 5789, 40: 12264, 48: 15502, 80: 28454},
}
BASE = ["model.hf_dir=null", "model.preset=llama-3.1-8b", "peft.lora.rank=32", "train.batch_size=1",
        "train.grad_accum=1"]
SETTINGS = {
    "jaxtune, remat offload": ["train.remat=offload", "train.mlp_chunk_tokens=1024", "train.loss_chunk_tokens=256"],
    "jaxtune, remat full (no host memory)": ["train.remat=full", "train.mlp_chunk_tokens=1024",
                                             "train.loss_chunk_tokens=256"],
}
GiB = 2**30


def _plan(overrides):
    return plan_step(load_config(TrainJobConfig, "configs/qlora_llama3_8b.yaml", BASE + overrides))


def table(budgets: list[int]) -> None:
    print("| longest context | " + " | ".join(f"{b} GB" for b in budgets) + " |")
    print("|---|" + "---|" * len(budgets))
    for name, row in PUBLISHED.items():
        print(f"| {name} | " + " | ".join("OOM" if row[b] is None else f"{row[b]:,}" for b in budgets) + " |")
    ratios = {}
    for name, overrides in SETTINGS.items():
        start = time.perf_counter()
        found = longest_context(_plan(overrides + ["train.seq_len=8192"]), [b * GiB for b in budgets])
        ratios[name] = [length / PUBLISHED["Unsloth"][b] for (length, _), b in zip(found, budgets)]
        cells = [f"{length:,}" if est else "none" for length, est in found]
        print(f"| {name} | " + " | ".join(cells) + " |")
        hosts = [f"{est.host / GiB:.0f}" if est else "-" for _, est in found]
        print("| (host GiB) | " + " | ".join(hosts) + f" |   <!-- {time.perf_counter() - start:.0f} s -->")
    print()
    for name, row in ratios.items():
        print(f"{name} / Unsloth: {', '.join(f'{r:.2f}x' for r in row)}")


def peak_at_8192() -> None:
    before = ["train.remat=full", "train.loss_chunk_tokens=2048"]
    for name, overrides in (("the recipe's settings (remat full, loss chunk 2048)", before),
                            ("remat offload, MLP chunk 1024, loss chunk 256", SETTINGS["jaxtune, remat offload"])):
        est = estimate(_plan(overrides + ["train.seq_len=8192"]))
        print(f"8,192 tokens, {name}: peak {est.peak / GiB:.2f} GiB (host {est.host / GiB:.2f} GiB)")


def check() -> None:
    small = dict(family="llama", vocab_size=4096, hidden_size=256, num_layers=2, num_heads=4, num_kv_heads=2,
                 head_dim=64, intermediate_size=704, max_position_embeddings=32768)
    for length in (8192, 16384):
        job = from_dict(TrainJobConfig, {
            "model": {"config": small, "quant": {"kind": "nf4"}}, "peft": {"lora": {"rank": 16, "targets": ["all-linear"]}},
            "train": {"batch_size": 1, "seq_len": length, "mlp_chunk_tokens": 512, "loss_chunk_tokens": 512}})
        plan = plan_step(job)
        est, xla = estimate(plan), compiled(plan)
        print(f"{length:,} tokens: estimate {est.peak / 2**20:.1f} MiB, XLA {xla['peak'] / 2**20:.1f} MiB, "
              f"ratio {est.peak / xla['peak']:.3f}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budgets", default="8,12,16,24,40,48,80")
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args()
    print(f"# {time.strftime('%Y-%m-%d')}")
    peak_at_8192()
    table([int(b) for b in args.budgets.split(",")])
    if args.check:
        check()


if __name__ == "__main__":
    main()

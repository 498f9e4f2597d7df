"""Memory of QLoRA vs LoRA vs full fine-tuning: the estimator against XLA's compiled step, side by side.

    python benchmarks/qlora_memory.py [--preset bench-llama-31m] [--batch 8] [--seq 128] [--dtype float32]
                                      [--recipes]   # also the 8B / 7B QLoRA recipes (estimate only; abstract)

For each method the job's train step is planned abstractly (`jaxtune.job.plan_step`), the
estimate printed next to XLA's `memory_analysis()` of the same step compiled with abstract inputs
(nothing allocated), per device. Also the storage of the quantized kernels (bits per parameter).
"""

from __future__ import annotations

import argparse
import time

from jaxtune.config import from_dict, load_config
from jaxtune.job import TrainJobConfig, plan_step
from jaxtune.train.memory import compiled, estimate
from jaxtune.utils.partition import count

LORA = {"lora": {"rank": 16, "alpha": 32, "targets": ["all-linear"]}}
METHODS = {
    "full": ({}, {}, {}),
    "lora r16": ({}, LORA, {}),
    "qlora r16 (nf4+dq)": ({"quant": {"kind": "nf4", "double_quant": True}}, LORA, {}),
    "qlora + adamw8bit": ({"quant": {"kind": "nf4", "double_quant": True}}, LORA, {"name": "adamw8bit", "min_8bit_size": 1024}),
    "full + adamw8bit": ({}, {}, {"name": "adamw8bit"}),
}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="bench-llama-31m")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--remat", default="none")
    parser.add_argument("--recipes", action="store_true")
    args = parser.parse_args()
    mib = 2**20
    print(f"{args.preset}: batch {args.batch} x seq {args.seq}, compute {args.dtype}, remat {args.remat}; MiB per device")
    print(f"{'method':22s} {'params':>8s} {'optim':>8s} {'activ.':>8s} {'estimate':>9s} {'XLA':>9s} {'ratio':>6s} {'est s':>6s} {'XLA s':>6s}")
    for name, (model, peft, optim) in METHODS.items():
        job = from_dict(TrainJobConfig, {"model": {"preset": args.preset, "dtype": args.dtype, **model}, "peft": peft,
                                         "optim": optim, "train": {"batch_size": args.batch, "seq_len": args.seq,
                                                                   "remat": args.remat}})
        t0 = time.perf_counter()
        plan = plan_step(job)
        est = estimate(plan)
        t1 = time.perf_counter()
        xla = compiled(plan)
        t2 = time.perf_counter()
        print(f"{name:22s} {est.params / mib:8.1f} {est.optimizer / mib:8.1f} {est.activations / mib:8.1f} "
              f"{est.peak / mib:9.1f} {xla['peak'] / mib:9.1f} {est.peak / xla['peak']:6.3f} {t1 - t0:6.1f} {t2 - t1:6.1f}",
              flush=True)
    if args.recipes:
        for recipe, preset in (("qlora_llama3_8b", "llama-3.1-8b"), ("qlora_qwen2_5_7b", "qwen2.5-7b")):
            job = load_config(TrainJobConfig, f"configs/{recipe}.yaml", ["model.hf_dir=null", f"model.preset={preset}"])
            t0 = time.perf_counter()
            plan = plan_step(job)
            est = estimate(plan)
            print(f"\nconfigs/{recipe}.yaml ({count(plan.params) - count(plan.trainable):,} params + "
                  f"{count(plan.trainable):,} LoRA), estimated in {time.perf_counter() - t0:.1f} s, GiB per device:")
            for row, value in est.rows():
                print(f"  {row:34s}{value / 2**30:8.3f}")


if __name__ == "__main__":
    main()

"""SFT end to end on this CPU, from the shipped recipes: the base of configs/pretrain_tiny_bytes.yaml,
then full / LoRA / QLoRA SFT by configs/sft_addition_demo.yaml, each scored by generation exact match
on the 128 held-out problems, next to the base prompted zero- and few-shot.

    python benchmarks/sft_exact_match.py                       # pretrain the base here, then all three
    python benchmarks/sft_exact_match.py --base runs/tiny_bytes --methods full,lora
    python benchmarks/sft_exact_match.py --steps 300 --out sft.json

One table: exact match, correct / examples, training wall seconds (compilation included; compare
rows of one run, not across machines), trainable parameters.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
import sys
import tempfile
import time

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from jaxtune.config import load_config
from jaxtune.job import TrainJobConfig  # noqa: E402
from jaxtune.job import run_eval_job  # noqa: E402
from jaxtune.job import run_training  # noqa: E402

QUIET = ["logging.progress=false", "logging.tensorboard=false"]
LORA = ["peft.lora.rank=16", "peft.lora.alpha=32", "peft.lora.targets=[all-linear]"]
METHODS = {"full": [], "lora": LORA, "qlora": [*LORA, "model.quant.kind=nf4", "model.quant.blocksize=32"],
           "lora_head": [*LORA, "train.trainable=[lm_head]"]}  # LoRA + the output layer (PEFT's modules_to_save)


def recipe(name: str, overrides: list[str]) -> TrainJobConfig:
    return load_config(TrainJobConfig, str(ROOT / "configs" / f"{name}.yaml"), [*QUIET, *overrides])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", help="a base checkpoint (default: train configs/pretrain_tiny_bytes.yaml here)")
    parser.add_argument("--steps", type=int, help="SFT steps (default: the recipe's)")
    parser.add_argument("--methods", default="full,lora,qlora,lora_head")
    parser.add_argument("--out", help="write the rows as JSON here")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="sft_em_"))
    rows = []
    if args.base:
        base = Path(args.base)
    else:
        base = work / "base"
        start = time.perf_counter()
        pretrained = run_training(recipe("pretrain_tiny_bytes", [f"checkpoint.directory={base}"]))
        rows.append({"run": "base: pretrain_tiny_bytes.yaml", "train_s": time.perf_counter() - start,
                     "eval_loss": pretrained.evals[-1]["loss"] if pretrained.evals else None})
    steps = [f"train.steps={args.steps}"] if args.steps else []
    for name, r in run_eval_job(recipe("sft_addition_demo", [f"model.checkpoint={base}"])).items():
        if "exact_match" in r:
            rows.append({"run": f"base, {name}", **{k: r[k] for k in ("exact_match", "correct", "examples")}})
    for method in [m for m in args.methods.split(",") if m]:
        directory = work / f"sft_{method}"
        overrides = [f"model.checkpoint={base}", f"checkpoint.directory={directory}", *steps, *METHODS[method]]
        start = time.perf_counter()
        trained = run_training(recipe("sft_addition_demo", overrides))
        seconds = time.perf_counter() - start
        results = run_eval_job(recipe("sft_addition_demo", [*overrides[1:], f"model.checkpoint={directory}"]))
        for name, r in results.items():
            if "exact_match" in r:
                rows.append({"run": f"SFT {method}, {name}", **{k: r[k] for k in ("exact_match", "correct", "examples")},
                             "train_s": seconds, "trainable": trained.trainable_params,
                             "eval_loss": results["loss"]["loss"]})
    print(f"\n{'run':<34} {'exact match':>11} {'correct':>9} {'train s':>8} {'trainable':>10} {'eval loss':>9}")
    for r in rows:
        em = f"{r['exact_match']:.4f}" if "exact_match" in r else ""
        correct = f"{r['correct']}/{r['examples']}" if "correct" in r else ""
        loss = f"{r['eval_loss']:.4f}" if r.get("eval_loss") is not None else ""
        print(f"{r['run']:<34} {em:>11} {correct:>9} {r.get('train_s', 0):>8.1f} {r.get('trainable', ''):>10} {loss:>9}")
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

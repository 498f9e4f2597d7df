"""Alignment end to end on this CPU, from the shipped recipes, on the shout task (a known preference:
asked to say a made-up word, shouting it is preferred):

  base (pretrain_tiny_bytes.yaml) -> SFT policy (sft_shout.yaml: shouts ~24% of the time)
  reward model (reward_shout.yaml) -> held-out pairwise accuracy / margin
  DPO (dpo_shout.yaml), PPO (ppo_shout.yaml; shared-trunk value head and a separate value network
  started from the reward model), GRPO (grpo_shout.yaml), each from the SFT policy

Every policy is then scored on the 64 held-out prompts, 4 samples each (eval task ``reward``): the
reward model's mean score, the share of upper-case letters, and the KL to the SFT policy (nats per
completion, on the policy's own samples).

    python benchmarks/align_shout.py                          # pretrain the base here, then everything
    python benchmarks/align_shout.py --base runs/tiny_bytes --out align.json
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


def recipe(name: str, overrides: list[str]) -> TrainJobConfig:
    return load_config(TrainJobConfig, str(ROOT / "configs" / f"{name}.yaml"), [*QUIET, *overrides])


def policy_tasks(rm: Path, sft: Path) -> str:
    common = "max_new_tokens: 8, completions: 4, batch_size: 64"
    return (f"eval.tasks=[{{kind: reward, name: rm, reward_model: '{rm}', reference: '{sft}', {common}}}, "
            f"{{kind: reward, name: upper, reward: uppercase, {common}}}]")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", help="a base checkpoint (default: train configs/pretrain_tiny_bytes.yaml here)")
    parser.add_argument("--out", help="write the rows as JSON here")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="align_shout_"))
    rows = []

    def timed(job):
        start = time.perf_counter()
        result = run_training(job)
        return result, time.perf_counter() - start

    base = Path(args.base) if args.base else work / "base"
    if not args.base:
        _, seconds = timed(recipe("pretrain_tiny_bytes", [f"checkpoint.directory={base}"]))
        rows.append({"run": "base (pretrain_tiny_bytes)", "train_s": seconds})
    rm, sft = work / "reward", work / "sft"
    trained, seconds = timed(recipe("reward_shout", [f"checkpoint.directory={rm}"]))
    rows.append({"run": "reward model (reward_shout)", "train_s": seconds,
                 "pair_accuracy": trained.evals[-1]["accuracy"], "pair_margin": trained.evals[-1]["margin"]})
    _, seconds = timed(recipe("sft_shout", [f"model.checkpoint={base}", f"checkpoint.directory={sft}"]))
    rows.append({"run": "SFT policy (sft_shout)", "train_s": seconds, "policy": sft})
    runs = {
        "DPO (dpo_shout)": ("dpo_shout", []),
        "PPO, value head (ppo_shout)": ("ppo_shout", [f"objective.ppo.reward_model={rm}"]),
        "PPO, value network = RM": ("ppo_shout", [f"objective.ppo.reward_model={rm}", f"objective.ppo.value_model={rm}"]),
        "GRPO (grpo_shout)": ("grpo_shout", []),
    }
    for label, (name, extra) in runs.items():
        directory = work / label.split(" ")[0].lower().replace(",", "") / str(len(rows))
        trained, seconds = timed(recipe(name, [f"model.checkpoint={sft}", f"checkpoint.directory={directory}", *extra]))
        row = {"run": label, "train_s": seconds, "policy": directory, "trainable": trained.trainable_params}
        if trained.evals:  # DPO: held-out implicit-reward accuracy and margin
            row.update(pair_accuracy=trained.evals[-1]["reward_accuracy"], pair_margin=trained.evals[-1]["reward_margin"])
        rows.append(row)
    for row in rows:
        if "policy" in row:
            job = recipe("ppo_shout", [f"model.checkpoint={row['policy']}", policy_tasks(rm, sft)])
            results = run_eval_job(job)
            row.update(rm_score=results["rm"]["reward_mean"], uppercase=results["upper"]["reward_mean"],
                       kl_to_sft=results["rm"]["kl"], stopped=results["rm"]["stopped"])
            row["policy"] = str(row["policy"])
    print(f"\n{'run':<30} {'train s':>7} {'pair acc':>8} {'margin':>7} {'RM score':>8} {'upper':>6} {'KL/SFT':>7} {'stopped':>7}")
    for r in rows:
        cell = lambda k, f: format(r[k], f) if r.get(k) is not None else ""  # noqa: E731
        print(f"{r['run']:<30} {cell('train_s', '.1f'):>7} {cell('pair_accuracy', '.3f'):>8} {cell('pair_margin', '.2f'):>7} "
              f"{cell('rm_score', '.2f'):>8} {cell('uppercase', '.3f'):>6} {cell('kl_to_sft', '.2f'):>7} {cell('stopped', '.2f'):>7}")
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""`jaxtune label [CONFIG] [key=value ...]`: AI-feedback preference labels (RLAIF) for DPO."""

from __future__ import annotations

import json

from jaxtune.cli.args import split_config_args
from jaxtune.config import load_config
from jaxtune.job.label import LabelJobConfig, label


def add_parser(sub) -> None:
    p = sub.add_parser("label", help="sample completions from a policy, rank them with a judge (reward model or LLM), "
                                     "write preference pairs for DPO")
    p.add_argument("args", nargs="*", help="[CONFIG.yaml] key=value ... (e.g. policy.checkpoint=runs/sft judge=llm)")
    p.set_defaults(func=run)


def run(args) -> int:
    config_path, overrides = split_config_args(args.args)
    print(json.dumps(label(load_config(LabelJobConfig, config_path, overrides))))
    return 0

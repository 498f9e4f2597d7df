"""`jaxtune lm-eval ARGS ...`: EleutherAI's lm-evaluation-harness command line with jaxtune's
backend registered (``--model jaxtune --model_args checkpoint=RUN,batch_size=8``;
`jaxtune.job.harness`). Every argument is lm-eval's."""

from __future__ import annotations

import argparse
import importlib

COMMAND = "lm-eval"  # jaxtune.cli.main hands every argument after it to lm-eval unparsed


def add_parser(sub) -> None:
    p = sub.add_parser(COMMAND, add_help=False, help="run lm-evaluation-harness on a jaxtune run or HF directory "
                       "(--model jaxtune --model_args checkpoint=RUN ...; lm-eval's own arguments)")
    p.add_argument("args", nargs=argparse.REMAINDER, help="lm-eval's arguments (lm-eval --help)")
    p.set_defaults(func=run)


def run(args) -> int:
    # imported on use: lm-eval is an optional extra (jaxtune[eval]), and importing the module
    # registers --model jaxtune; without lm-eval its ImportError names the extra
    return importlib.import_module("jaxtune.job.harness").main(list(args.args))

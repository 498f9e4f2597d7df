"""`jaxtune lm-eval ARGS ...`: EleutherAI's lm-evaluation-harness command line with jaxtune's
backend registered (``--model jaxtune --model_args checkpoint=RUN,batch_size=8``;
`jaxtune.eval.harness`). Every argument is lm-eval's."""

from __future__ import annotations

import argparse

COMMAND = "lm-eval"  # jaxtune.cli.main hands every argument after it to lm-eval unparsed


def add_parser(sub) -> None:
    p = sub.add_parser(COMMAND, add_help=False, help="run lm-evaluation-harness on a jaxtune run or HF directory "
                       "(--model jaxtune --model_args checkpoint=RUN ...; lm-eval's own arguments)")
    p.add_argument("args", nargs=argparse.REMAINDER, help="lm-eval's arguments (lm-eval --help)")
    p.set_defaults(func=run)


def run(args) -> int:
    from jaxtune.eval.harness import main  # registers --model jaxtune; ImportError names the extra

    return main(list(args.args))

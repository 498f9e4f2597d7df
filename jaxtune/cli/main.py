"""`jaxtune SUBCOMMAND ...` entry point. Each subcommand lives in its own module."""

from __future__ import annotations

import argparse
import sys

from jaxtune.cli import convert, estimate, generate, label, tokenizer, train
from jaxtune.cli.args import split_config_args
from jaxtune.config import ConfigError

__all__ = ["build_parser", "main", "split_config_args"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxtune", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    generate.add_parser(sub)
    convert.add_parser(sub)
    estimate.add_parser(sub)
    train.add_parsers(sub)
    label.add_parser(sub)
    tokenizer.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ConfigError, FileNotFoundError, FileExistsError, ValueError, KeyError, FloatingPointError, RuntimeError) as err:
        print(f"jaxtune {args.command}: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

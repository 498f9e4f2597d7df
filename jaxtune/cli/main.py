"""`jaxtune SUBCOMMAND ...` entry point. Each subcommand lives in its own module."""

from __future__ import annotations

import argparse
import sys

from jaxtune.config import ConfigError


def split_config_args(args: list[str]) -> tuple[str | None, list[str]]:
    """[CONFIG.yaml] key=value ... -> (config path or None, overrides)."""
    config = None
    overrides = []
    for a in args:
        if "=" in a:
            overrides.append(a)
        elif config is None:
            config = a
        else:
            raise ConfigError(f"unexpected argument {a!r}: give one config file and key=value overrides")
    return config, overrides


def build_parser() -> argparse.ArgumentParser:
    from jaxtune.cli import convert, estimate, generate, label, tokenizer, train

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

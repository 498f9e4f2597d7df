"""`jaxtune SUBCOMMAND ...` entry point. Each subcommand lives in its own module."""

from __future__ import annotations

import argparse
import sys

from jaxtune.config import ConfigError

NOT_BUILT = {
    "train": "the training loop (sharded jit step, optimizer, Orbax checkpoints) is not built yet; "
             "it lands with the training-loop issue. Nothing was run.",
    "eval": "evaluation from checkpoints is not built yet; it lands with the training-loop and SFT/eval issues. "
            "Nothing was run.",
}


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
    from jaxtune.cli import convert, estimate, generate

    parser = argparse.ArgumentParser(prog="jaxtune", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    generate.add_parser(sub)
    convert.add_parser(sub)
    estimate.add_parser(sub)
    for name, message in NOT_BUILT.items():
        p = sub.add_parser(name, help=f"(not built yet) {name}")
        p.add_argument("args", nargs="*")
        p.set_defaults(func=lambda _a, m=message, n=name: _not_built(n, m))
    return parser


def _not_built(name: str, message: str) -> int:
    print(f"jaxtune {name}: {message}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ConfigError, FileNotFoundError, FileExistsError, ValueError, KeyError) as err:
        print(f"jaxtune {args.command}: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

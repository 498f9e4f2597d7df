"""`jaxtune SUBCOMMAND ...` entry point. Each subcommand lives in its own module.

A failure the user can act on (a bad config, a missing or corrupt file, a full or read-only disk, a
run directory in use) is printed as one line, ``jaxtune CMD: error: ...``, exit status 1;
``--debug`` (or ``JAXTUNE_DEBUG=1``) shows the traceback instead.
"""

from __future__ import annotations

import argparse
import errno
import os
import sys

from jaxtune.cli import chat, convert, estimate, generate, harness, label, plot, tokenizer, train
from jaxtune.cli.args import split_config_args
from jaxtune.config import ConfigError

__all__ = ["build_parser", "main", "split_config_args", "one_line"]

DEBUG_ENV = "JAXTUNE_DEBUG"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxtune", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true", help=f"show tracebacks (also {DEBUG_ENV}=1)")
    sub = parser.add_subparsers(dest="command", required=True)
    generate.add_parser(sub)
    chat.add_parser(sub)
    convert.add_parser(sub)
    estimate.add_parser(sub)
    train.add_parsers(sub)
    label.add_parser(sub)
    tokenizer.add_parser(sub)
    harness.add_parser(sub)
    plot.add_parser(sub)
    return parser


def one_line(err: BaseException) -> str:
    """The message a user reads: the error's own text on one line, with the OS's words for an
    OSError (the file it names included), and the first cause's text when the error only wraps
    another (Orbax and tensorstore re-raise I/O failures from their threads)."""
    if isinstance(err, OSError) and err.errno is not None:
        where = f"{err.filename}: " if err.filename else ""
        hint = {errno.ENOSPC: " (the disk is full)", errno.EROFS: " (read-only file system)",
                errno.EACCES: " (permission denied)"}.get(err.errno, "")
        return f"{where}{err.strerror or err}{hint}"
    text = " ".join(str(err).split())
    cause = err.__cause__ or err.__context__
    if cause is not None and isinstance(cause, OSError) and cause.errno in (errno.ENOSPC, errno.EROFS, errno.EACCES):
        return f"{text}: {one_line(cause)}" if text else one_line(cause)
    if isinstance(err, KeyError) and len(err.args) == 1:
        text = str(err.args[0])
    return text or type(err).__name__


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == [harness.COMMAND]:  # every later argument is lm-eval's, options included
        args = argparse.Namespace(command=harness.COMMAND, func=harness.run, args=argv[1:], debug=False)
    else:
        args, extra = parser.parse_known_args(argv)
        # key=value overrides may follow a flag (`train CONFIG --print-config train.steps=7`): argparse
        # leaves those after the first flag unparsed
        unknown = [a for a in extra if a.startswith("-") or not hasattr(args, "args")]
        if unknown:
            parser.error(f"unrecognized arguments: {' '.join(unknown)}")
        if extra:
            args.args = [*args.args, *extra]
    debug = args.debug or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(f"jaxtune {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # every failure reaches the user as one line unless they ask for the traceback
        if debug:
            raise
        message = one_line(err)
        if not isinstance(err, EXPECTED):  # likely a bug: say what kind, and how to see where
            message = f"{type(err).__name__}: {message} (--debug or {DEBUG_ENV}=1 shows the traceback)"
        print(f"jaxtune {args.command}: error: {message}", file=sys.stderr)
        return 1


# errors that are the input's fault, whose message says what to fix
EXPECTED = (ConfigError, OSError, ValueError, KeyError, FloatingPointError, RuntimeError, ImportError)


if __name__ == "__main__":
    sys.exit(main())

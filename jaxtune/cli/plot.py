"""`jaxtune plot RUN [RUN ...] [--out PNG]`: training and held-out loss of one or several runs against
steps and tokens seen, on one figure (`jaxtune.eval.plot`)."""

from __future__ import annotations

from pathlib import Path

from jaxtune.eval.plot import plot_runs


def add_parser(sub) -> None:
    p = sub.add_parser("plot", help="loss curves of one or several runs as a PNG")
    p.add_argument("runs", nargs="+", help="run directories (or metrics.jsonl files)")
    p.add_argument("--out", default=None, help="the PNG to write (default: loss.png in the first run's directory)")
    p.add_argument("--title", default=None)
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    p.set_defaults(func=run)


def run(args) -> int:
    first = Path(args.runs[0])
    out = Path(args.out) if args.out else (first if first.is_dir() else first.parent) / "loss.png"
    if out.exists() and not args.overwrite:
        raise FileExistsError(f"{out} exists (--overwrite replaces it)")
    plot_runs(args.runs, out, title=args.title)
    print(f"wrote {out}")
    return 0

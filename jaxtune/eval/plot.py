"""Loss curves as a picture: training and held-out loss of one or several runs on one figure.

`read_curves` reads a run's ``metrics.jsonl`` (the training loop's log: ``train/loss``, ``eval/loss``
and ``train/tokens``, the loss tokens since the previous logged step; a resumed run appends to it,
and a step logged twice keeps its last value). `plot_runs` draws loss against steps and, when the runs logged their token counts,
against tokens seen, one colour per run (solid: training, dashed with dots: held-out), and writes a
PNG. matplotlib's object API is used (no pyplot state, no display needed).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple, Sequence

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

METRICS_FILE = "metrics.jsonl"


class Curves(NamedTuple):
    name: str
    train: list[tuple[int, float]]  # (step, loss)
    eval: list[tuple[int, float]]
    tokens: dict[int, float]  # step -> tokens seen up to it (cumulative), when logged


def read_curves(run: str | Path, name: str | None = None) -> Curves:
    """The losses a run logged (its directory or its metrics.jsonl); an error names a missing file
    or a line that is not JSON."""
    path = Path(run)
    path = path / METRICS_FILE if path.is_dir() else path
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such metrics file (jaxtune train writes {METRICS_FILE} into the run "
                                "directory unless logging.jsonl=false)")
    train, held_out, windows = {}, {}, {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{number}: not a JSON line ({err.msg})") from None
        step = int(record.get("step", 0))
        if isinstance(record.get("train/loss"), (int, float)):
            train[step] = float(record["train/loss"])
        if isinstance(record.get("eval/loss"), (int, float)):
            held_out[step] = float(record["eval/loss"])
        if isinstance(record.get("train/tokens"), (int, float)):
            windows[step] = float(record["train/tokens"])  # the loss tokens since the previous logged step
    tokens, seen = {}, 0.0
    for step in sorted(windows):  # a resumed run re-logs the steps after its checkpoint: the last value counts
        seen += windows[step]
        tokens[step] = seen
    label = name or (path.parent.name if path.name == METRICS_FILE else path.stem)
    return Curves(label, sorted(train.items()), sorted(held_out.items()), tokens)


def plot_runs(runs: Sequence[str | Path], out: str | Path, *, title: str | None = None) -> Figure:
    """Draw the runs' loss curves (module docstring) and save them to ``out`` (PNG); -> the figure."""
    curves = [read_curves(r) for r in runs]
    if not any(c.train or c.eval for c in curves):
        raise ValueError(f"no train/loss or eval/loss in {', '.join(map(str, runs))}")
    by_tokens = all(c.tokens for c in curves)
    figure = Figure(figsize=(11 if by_tokens else 6.5, 4.2), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, 2 if by_tokens else 1, squeeze=False)[0]
    for i, c in enumerate(curves):
        colour = f"C{i}"
        for ax, x_of in zip(axes, (lambda s: s, lambda s, t=c.tokens: t.get(s))):
            for points, style, kind in ((c.train, "-", "train"), (c.eval, "--o", "held-out")):
                xy = [(x_of(s), v) for s, v in points if x_of(s) is not None]
                if xy:
                    ax.plot(*zip(*xy), style, color=colour, markersize=3, label=f"{c.name} {kind}")
    for ax, xlabel in zip(axes, ("step", "tokens seen")):
        ax.set_xlabel(xlabel)
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        figure.suptitle(title)
    figure.savefig(str(out), dpi=110)
    return figure

"""What `jaxtune eval` prints and keeps: a table of every task's metrics, and a JSON report that is
never overwritten."""

from __future__ import annotations

import json
import time
from pathlib import Path


def unused_path(directory: Path) -> Path:
    """``directory/<UTC time>.json``, or ``<UTC time>-<n>.json`` when that exists."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    path, n = directory / f"{stamp}.json", 1
    while path.exists():
        path, n = directory / f"{stamp}-{n}.json", n + 1
    return path


def write_report(path: Path, results: dict, **context) -> Path:
    """``{**context, "time", "results"}`` as JSON at ``path`` (its directory is created)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    report = {**context, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "results": results}
    path.write_text(json.dumps(report, indent=2, default=float) + "\n")
    return path


def format_table(results: dict) -> str:
    rows = [("task", "metric", "value")]
    for task, metrics in results.items():
        for key, value in metrics.items():
            if key == "samples" or isinstance(value, dict):
                continue
            rows.append((task, key, f"{value:.4f}" if isinstance(value, float) else str(value)))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)

"""One section's record (rows, notes, goals, its share of the time budget) and the small helpers every
section uses: JSON-safe values, error texts, atomic writes, device memory."""

from __future__ import annotations

import datetime
import gc
import math
import os
import time
from pathlib import Path
from typing import Any, Optional

import jax
import numpy as np

from accelerator.report import verdict

GiB = 2**30


class Section:
    """One section's record: rows (dicts), notes, summary figures; every change is flushed to disk
    (``suite``: the run, `accelerator_suite.Suite`)."""

    def __init__(self, suite, key: str, number: int, title: str, columns: list, deadline: float):
        self.suite, self.deadline = suite, deadline
        self.record = {"number": number, "title": title, "status": "running", "seconds": None, "error": None,
                       "traceback": None, "columns": columns, "rows": [], "notes": [], "summary": {}}
        self.skipped_rows = 0

    def add(self, row: dict) -> dict:
        self.record["rows"].append(row)
        self.suite.flush()
        return row

    def note(self, text: str) -> None:
        self.record["notes"].append(text)
        self.suite.flush()

    def out_of_time(self) -> bool:
        return time.monotonic() > self.deadline

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def skip(self, row: dict) -> None:
        """A row not measured for lack of time."""
        self.skipped_rows += 1
        self.add({**row, "note": "skipped: time budget"})

    def goal(self, name: str, criterion: str, measured: str, passed: Optional[bool]) -> str:
        """Record one of the issue's goals (``name``: what, ``criterion``: the target) against a figure;
        -> the row's cell. A smoke run's figures judge nothing (n/a)."""
        if self.suite.smoke:
            passed = None
        self.suite.data["goals"].append({"section": self.record["number"], "goal": f"{name}: {criterion}",
                                         "measured": measured, "pass": passed})
        return f"{verdict(passed)} ({criterion})"

    def fits(self, seconds: float) -> bool:
        """Whether a row like one that took ``seconds`` still fits in this section's time."""
        return self.remaining() > seconds


def clock() -> str:
    """The wall-clock time of day, for progress lines."""
    return datetime.datetime.now().strftime("%H:%M:%S")


def error_text(err: BaseException) -> str:
    text = f"{type(err).__name__}: {err}".strip()
    return text if len(text) <= 2000 else text[:2000] + " ..."


def plain(value: Any) -> Any:
    """JSON-safe: numpy scalars to Python, non-finite floats to strings, tuples to lists."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, (np.generic,)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def release_memory() -> None:
    gc.collect()
    try:
        jax.clear_caches()
    except Exception:
        pass


def memory_stats() -> Optional[dict]:
    try:
        stats = jax.devices()[0].memory_stats()
    except Exception:
        return None
    return dict(stats) if stats else None


def is_oom(err: BaseException) -> bool:
    text = str(err)
    return "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower() or "OOM" in text

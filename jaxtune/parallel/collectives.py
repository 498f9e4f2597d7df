"""Small host-side collectives over all processes (JSON values, flags), for the loop's
bookkeeping: the data position of every host's shards, whether any host has data left."""

from __future__ import annotations

import json
from typing import Any

import jax
import numpy as np


def allgather_json(value: Any) -> list[Any]:
    """Every process's JSON-serialisable ``value``, in process order (a list of one when single-process)."""
    if jax.process_count() == 1:
        return [value]
    from jax.experimental import multihost_utils

    data = np.frombuffer(json.dumps(value, sort_keys=True).encode("utf-8"), np.uint8)
    lengths = np.asarray(multihost_utils.process_allgather(np.asarray([len(data)], np.int32))).reshape(-1)
    padded = np.zeros(int(lengths.max()), np.uint8)
    padded[: len(data)] = data
    gathered = np.asarray(multihost_utils.process_allgather(padded)).reshape(len(lengths), -1)
    return [json.loads(bytes(row[:n]).decode("utf-8")) for row, n in zip(gathered, lengths)]


def any_process(flag: bool) -> bool:
    """True if ``flag`` is true on any process."""
    if jax.process_count() == 1:
        return bool(flag)
    from jax.experimental import multihost_utils

    return bool(np.asarray(multihost_utils.process_allgather(np.asarray([flag], np.int32))).any())

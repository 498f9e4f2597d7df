"""Prefetch: a background thread keeps the next batches of a stream ready.

Reading, tokenizing and packing run while the accelerator computes the current step.
Each prefetched batch travels with the stream's state *after* it, so `get_state` reports
the position of the last batch handed out, not of the read-ahead: a checkpoint taken
between steps resumes exactly where the consumer was. Errors in the thread (a bad row,
a missing file) are raised in the consumer at the batch they belong to.
"""

from __future__ import annotations

import queue
import threading
from typing import Any, Optional

_END = object()


class Prefetch:
    """Wrap a batch stream with ``depth`` batches of read-ahead (``depth=0``: no thread)."""

    def __init__(self, stream: Any, depth: int = 2):
        if depth < 0:
            raise ValueError(f"data.prefetch must be >= 0, got {depth}")
        self.stream, self.depth = stream, depth
        self._state = stream.get_state()
        self._queue: Optional[queue.Queue] = None
        self._stop: Optional[threading.Event] = None
        self._thread: Optional[threading.Thread] = None

    def __getattr__(self, name):  # process_local, merge_states, empty_batch, skipped, ...
        if name == "stream":
            raise AttributeError(name)
        return getattr(self.stream, name)

    def __iter__(self):
        return self

    def _produce(self, q: queue.Queue, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                item = (next(self.stream), self.stream.get_state())
            except StopIteration:
                item = _END
            except BaseException as err:  # noqa: BLE001 - handed to the consumer
                item = err
            while not stop.is_set():
                try:
                    q.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if item is _END or isinstance(item, BaseException):
                return

    def _start(self) -> None:
        self._queue, self._stop = queue.Queue(self.depth), threading.Event()
        self._thread = threading.Thread(target=self._produce, args=(self._queue, self._stop), daemon=True,
                                        name="jaxtune-prefetch")
        self._thread.start()

    def __next__(self):
        if self.depth == 0:
            batch = next(self.stream)
            self._state = self.stream.get_state()
            return batch
        if self._thread is None:
            self._start()
        item = self._queue.get()
        if item is _END:
            self._queue.put(_END)  # stay finished
            raise StopIteration
        if isinstance(item, BaseException):
            self._queue.put(item)
            raise item
        batch, self._state = item
        return batch

    def get_state(self) -> dict:
        return self._state

    def set_state(self, state: dict) -> None:
        self.close()
        self.stream.set_state(state)
        self._state = self.stream.get_state()

    def close(self) -> None:
        """Stop the read-ahead thread (the stream's position stays that of the last batch handed out)."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = self._queue = self._stop = None
            self.stream.set_state(self._state)  # rewind the read-ahead

"""Stopping a run on request: SIGTERM (preemption) and Ctrl-C, at step boundaries.

`StopSignals` is the context the training loop runs in: it turns SIGTERM and the first Ctrl-C into a
requested stop (the loop saves, then returns "preempted" / "interrupted"), and a second Ctrl-C into
an immediate KeyboardInterrupt whose exit nothing can hold up. The exit codes are the CLI's.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from typing import Optional

import jax
from jax.experimental import multihost_utils

PREEMPTED_EXIT_CODE = 143  # 128 + SIGTERM: the state was saved; schedulers should requeue the job
INTERRUPTED_EXIT_CODE = 130  # 128 + SIGINT: stopped by Ctrl-C (the state was saved, unless it was the second)
EXIT_GRACE_S = 3.0  # after a second Ctrl-C, how long the interpreter's own shutdown may take


class StopSignals:
    """SIGTERM or Ctrl-C -> stop at a step boundary (the loop then saves); `reached(step)` gives the
    status to stop with ("preempted" / "interrupted"), or None. Handlers are put back on exit.

    Single process, main thread: Python handlers set a flag. SIGTERM -> "preempted". The first
    Ctrl-C (SIGINT) -> "interrupted", and a line on stderr says so; the second gives Ctrl-C back to
    the handler it replaced and raises KeyboardInterrupt where the program is (finally blocks run;
    closing the metrics logger is bounded), and should the interpreter's shutdown then hang, the
    process ends after EXIT_GRACE_S (`_end_if_exit_hangs`). Ctrl-C is taken over only from Python's
    default handler: an ignored SIGINT (a background job) or a caller's own handler is left alone.

    Several processes: JAX's preemption sync point (jax.distributed's preemption service, which
    watches SIGTERM itself), so every host stops after the same step; no handler is installed
    there, since it would replace the service's. Ctrl-C keeps its default (KeyboardInterrupt)
    there: it reaches only the processes started from the terminal it was typed in, and a flag set
    on those would stop them after a step the others do not stop at (those would then wait in its
    collectives for ever); only SIGTERM goes through the sync point, so send SIGTERM to every
    process to save and stop a multi-process run."""

    def __init__(self, saves: bool = True):
        self.status: Optional[str] = None  # the first stop requested
        self._saves = saves
        self._interrupts = 0
        self._previous: dict = {}
        self._multi = jax.process_count() > 1

    def __enter__(self):
        if self._multi or threading.current_thread() is not threading.main_thread():
            return self
        self._previous[signal.SIGTERM] = signal.signal(signal.SIGTERM, self._terminate)
        if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            self._previous[signal.SIGINT] = signal.signal(signal.SIGINT, self._interrupt)
        return self

    def _terminate(self, signum, frame):
        self.status = self.status or "preempted"

    def _interrupt(self, signum, frame):
        self._interrupts += 1
        if self._interrupts > 1:
            signal.signal(signal.SIGINT, self._previous.pop(signal.SIGINT))
            _end_if_exit_hangs()
            raise KeyboardInterrupt
        self.status = self.status or "interrupted"
        what = "saving the state after this step, then stopping" if self._saves else \
            "stopping after this step (no checkpoint directory: nothing is saved)"
        try:  # os.write: a print could re-enter stderr's buffer if the signal came in the middle of a write
            os.write(2, f"\njaxtune: Ctrl-C: {what}; press Ctrl-C again to exit at once (unsaved).\n".encode())
        except OSError:
            pass

    def __exit__(self, *exc):
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()

    def reached(self, step: int) -> Optional[str]:
        if self._multi:
            return "preempted" if multihost_utils.reached_preemption_sync_point(step) else None
        return self.status


_exit_watch = threading.Lock()  # held once the watchdog below runs


def _end_if_exit_hangs(grace_s: float = EXIT_GRACE_S) -> None:
    """Once the main thread has finished (the interpreter is shutting down), give the shutdown
    `grace_s` seconds, then end the process with INTERRUPTED_EXIT_CODE: after a second Ctrl-C
    nothing (a non-daemon thread, an exit hook waiting on a save or on I/O) may hold exit up. A
    program that catches the KeyboardInterrupt and carries on (a notebook) is untouched."""
    if not _exit_watch.acquire(blocking=False):
        return

    def watch():
        threading.main_thread().join()  # returns when the interpreter starts shutting down
        time.sleep(grace_s)
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
        os._exit(INTERRUPTED_EXIT_CODE)

    threading.Thread(target=watch, name="jaxtune-exit-watchdog", daemon=True).start()

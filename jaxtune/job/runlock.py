"""One run per directory: a lock file that names its holder, taken over when the holder is dead.

``RUN_LOCK_FILE`` in a run directory holds ``{"pid", "host", "since", "command"}`` of the process
training into it. It is created with ``O_CREAT | O_EXCL`` (atomic on local and NFSv3+ file
systems), so of two runs started together exactly one gets it; the other is refused with a message
naming the holder. A lock left by a process that died (SIGKILL, a lost machine) is detected when
the holder is on this host and its pid no longer runs, and is then taken over with a warning; a
lock held from another host is never broken automatically (the message says how to remove it).

Multi-process runs: only process 0 takes the lock (the other processes of one run share the
directory by design). Remote directories (``gs://...``) are not locked: object stores have no
exclusive create.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
import warnings
from pathlib import Path
from typing import Optional

import jax

RUN_LOCK_FILE = ".jaxtune.lock"


class RunLockedError(RuntimeError):
    """Another live process is training into this directory."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


class RunLock:
    """``with RunLock(directory):`` -- hold the directory's lock for the duration of a run."""

    def __init__(self, directory: Optional[str | os.PathLike]):
        text = None if directory is None else os.fspath(directory)
        self.path: Optional[Path] = None
        if text is not None and "://" not in text and jax.process_index() == 0:
            self.path = Path(os.path.abspath(text)) / RUN_LOCK_FILE
        self._held = False

    def holder(self) -> Optional[dict]:
        """The lock file's record, or None when there is no lock (an unreadable one reads as {})."""
        if self.path is None or not self.path.exists():
            return None
        try:
            return json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            return {}

    def acquire(self) -> None:
        if self.path is None or self._held:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        record = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                  "command": " ".join(sys.argv)[:300]}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self.holder()
                if holder is None:  # released between our open and our read: try again
                    continue
                if not self._stale(holder):
                    raise RunLockedError(
                        f"{self.path.parent} is in use by another run (pid {holder.get('pid')} on "
                        f"{holder.get('host')} since {holder.get('since')}: {holder.get('command', '?')}); "
                        f"use another checkpoint.directory, or delete {self.path} if that run is gone") from None
                warnings.warn(f"{self.path}: taking over the lock of a run that is no longer running "
                              f"(pid {holder.get('pid')} on {holder.get('host')} since {holder.get('since')})",
                              stacklevel=2)
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(record) + "\n")
            self._held = True
            return
        raise RunLockedError(f"{self.path}: could not take the run lock (it keeps changing hands)")

    @staticmethod
    def _stale(holder: dict) -> bool:
        """A holder on this host whose pid is gone (or a record too broken to name one)."""
        pid = holder.get("pid")
        if not isinstance(pid, int):
            return True
        return holder.get("host") == socket.gethostname() and not _alive(pid)

    def release(self) -> None:
        if self._held and self.path is not None:
            holder = self.holder() or {}
            if holder.get("pid") == os.getpid():
                self.path.unlink(missing_ok=True)
            self._held = False

    def __enter__(self) -> "RunLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

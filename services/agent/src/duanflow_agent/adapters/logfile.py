"""Replica output kept on the agent's disk, one file per replica, so a failed start can point at it."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path


class ReplicaLogFile:
    """An append-only, line-buffered text log: ``<UTC time> <stream> <line>`` per line."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._file = path.open("a", encoding="utf-8", buffering=1)

    def write(self, stream: str, line: str) -> None:
        """Append one line (never raises: a full disk must not take the replica's relay down)."""
        if self._file.closed:
            return
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime())
        with contextlib.suppress(OSError):
            self._file.write(f"{stamp}Z {stream} {line}\n")

    def close(self) -> None:
        """Flush and close."""
        self._file.close()


def open_log(path: Path) -> ReplicaLogFile:
    """Open (append) the log file of one replica."""
    return ReplicaLogFile(path)

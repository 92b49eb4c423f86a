"""Process runtime: replicas are child processes in their own session, output read line by line."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Mapping
from pathlib import Path

from duanflow_agent.ports import LineSink

LINE_LIMIT = 1024 * 1024
DRAIN_AFTER_EXIT_S = 2.0


class ProcessReplica:
    """One replica process and the tasks reading its pipes (owned here, awaited by :meth:`wait`)."""

    def __init__(self, proc: asyncio.subprocess.Process, on_line: LineSink) -> None:
        self._proc = proc
        assert proc.stdout is not None and proc.stderr is not None
        self._readers = [
            asyncio.create_task(_pump(proc.stdout, "stdout", on_line)),
            asyncio.create_task(_pump(proc.stderr, "stderr", on_line)),
        ]
        self._code: int | None = None

    @property
    def pid(self) -> int:
        """Process id."""
        return self._proc.pid

    async def wait(self) -> int:
        """Wait for exit and for its output to be read (briefly: a grandchild may hold the pipes)."""
        if self._code is None:
            code = await self._proc.wait()
            # Whatever the replica left running in its session dies with it: no orphans holding GPUs or pipes.
            _kill_group(self._proc.pid)
            _, pending = await asyncio.wait(self._readers, timeout=DRAIN_AFTER_EXIT_S)
            for task in pending:
                task.cancel()
            self._code = code
        return self._code

    async def stop(self, grace_s: float) -> int:
        """SIGTERM the replica, SIGKILL its whole process group after ``grace_s``."""
        if self._proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self._proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._proc.wait()), timeout=max(grace_s, 0.0))
        _kill_group(self._proc.pid)
        return await self.wait()


def _kill_group(pgid: int) -> None:
    """SIGKILL the replica's process group (it leads its own session, so the group id is its pid)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


async def _pump(stream: asyncio.StreamReader, name: str, on_line: LineSink) -> None:
    while True:
        try:
            raw = await stream.readline()
        except ValueError:  # a line over LINE_LIMIT: asyncio discarded it
            on_line(name, f"[duanflow: a line of over {LINE_LIMIT} bytes was dropped]")
            continue
        if not raw:
            return
        on_line(name, raw.decode("utf-8", "replace").rstrip("\r\n"))


class ProcessSpawner:
    """Starts replicas as child processes, each in a new session (Ctrl-C on the agent's terminal is not theirs)."""

    async def spawn(self, argv: list[str], *, cwd: Path, env: Mapping[str, str], on_line: LineSink) -> ProcessReplica:
        """Start ``argv`` in ``cwd`` with exactly ``env``."""
        proc = await asyncio.create_subprocess_exec(
            *argv,
            cwd=cwd,
            env=dict(env),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,
            limit=LINE_LIMIT,
        )
        return ProcessReplica(proc, on_line)

"""NATS side of the agent: readiness announcements and the log relay of replica output."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from typing import Any

from duanflow_proto import codec, subjects
from duanflow_proto.messages.agent import StartReplica
from duanflow_proto.messages.logs import LEVEL_MARK, LEVELS, LogLine
from nats.aio.client import Client as NatsClient

from duanflow_agent.domain import AGENT_STREAM
from duanflow_agent.ports import LineSink

log = logging.getLogger("duanflow.agent.nats")


class NatsReadySignal:
    """Replicas publish an Ack on ``subjects.replica_ready(replica_id)`` once they pull."""

    def __init__(self, nc: NatsClient) -> None:
        self._nc = nc

    @asynccontextmanager
    async def listen(self, replica_id: str) -> AsyncIterator[Awaitable[None]]:
        """Subscribe before the replica is spawned so its announcement cannot be missed."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        async def on_ready(_msg: Any) -> None:
            if not fut.done():
                fut.set_result(None)

        sub = await self._nc.subscribe(subjects.replica_ready(replica_id), cb=on_ready)
        await self._nc.flush()  # the subscription is live on the server before the spawn
        try:
            yield fut
        finally:
            await sub.unsubscribe()
            if not fut.done():
                fut.cancel()


class _Source:
    """Where one replica's lines go, and how many were dropped since the last marker."""

    __slots__ = ("app", "dropped", "env", "function", "limited", "refilled", "release", "replica", "subject", "tokens")

    def __init__(self, cmd: StartReplica, burst: float) -> None:
        self.subject = subjects.logs(cmd.env, cmd.app, "runtime", cmd.replica_id)
        self.env, self.app, self.release = cmd.env, cmd.app, cmd.release
        self.function, self.replica = cmd.function, cmd.replica_id
        self.dropped = 0
        self.limited = 0
        """Of :attr:`dropped`, lines over the rate limit (the rest found the buffer full)."""
        self.tokens = burst
        self.refilled = time.monotonic()

    def admit(self, rate: float, burst: float) -> bool:
        """Token bucket: whether one more line fits ``rate`` lines/s with bursts of ``burst``."""
        now = time.monotonic()
        self.tokens = min(burst, self.tokens + (now - self.refilled) * rate)
        self.refilled = now
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True


class LogRelay:
    """Publishes replica output as ``LogLine``s; a bounded buffer between pipe readers and NATS.

    Readers never wait on NATS: a replica writing more than ``rate`` lines/s (bursts of ``burst``), or any line
    finding the buffer full, is dropped and counted, and a marker line saying how many were lost is queued
    just before that replica's next line.
    """

    def __init__(self, nc: NatsClient, max_lines: int, rate: float = 5_000.0, burst: float = 20_000.0) -> None:
        self._nc = nc
        self._queue: asyncio.Queue[tuple[_Source, int, str, str, str]] = asyncio.Queue(maxsize=max(1, max_lines))
        self.rate, self.burst = rate, max(1.0, burst)
        self.dropped_total = 0

    def sink(self, cmd: StartReplica, also: LineSink | None = None) -> LineSink:
        """A line sink for one replica; ``also`` sees every line too (the stderr tail)."""
        src = _Source(cmd, self.burst)
        put = self._queue.put_nowait

        def on_line(stream: str, line: str) -> None:
            level = "warning" if stream == AGENT_STREAM else "info"
            if line.startswith(LEVEL_MARK):  # a Python logging record: its level, then the text
                marked, _, line = line[len(LEVEL_MARK) :].partition("\t")
                level = marked if marked in LEVELS else level
            if also is not None:
                also(stream, line)
            if not src.admit(self.rate, self.burst):
                src.dropped += 1
                src.limited += 1
                self.dropped_total += 1
                return
            now_ms = time.time_ns() // 1_000_000
            try:
                if src.dropped:  # where the gap is: before this line, counted
                    why = f"over {self.rate:g} lines/s" if src.limited == src.dropped else "log relay too slow"
                    put((src, now_ms, AGENT_STREAM, f"[duanflow: {src.dropped} lines dropped: {why}]", "warning"))
                    src.dropped = src.limited = 0
                put((src, now_ms, stream, line, level))
            except asyncio.QueueFull:
                src.dropped += 1
                self.dropped_total += 1

        return on_line

    async def run(self) -> None:
        """Publish buffered lines until cancelled."""
        get = self._queue.get
        publish = self._nc.publish
        while True:
            src, ts_ms, stream, line, level = await get()
            try:
                await publish(src.subject, self._encode(src, ts_ms, stream, line, level))
            except Exception as exc:  # NATS down: lose this line, keep relaying
                log.warning("log line of %s not published: %s", src.replica, exc)
            finally:
                self._queue.task_done()

    async def flush(self, wait_s: float = 2.0) -> None:
        """Wait (bounded) until the buffer is empty, then flush the connection."""
        deadline = time.monotonic() + wait_s
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._queue.join(), wait_s)
        try:
            await self._nc.flush(timeout=max(1, int(deadline - time.monotonic())))
        except Exception as exc:
            log.debug("flush of log lines failed: %s", exc)

    @staticmethod
    def _encode(src: _Source, ts_ms: int, stream: str, line: str, level: str) -> bytes:
        return codec.encode(
            LogLine(
                ts_ms=ts_ms,
                env=src.env,
                app=src.app,
                kind="runtime",
                source=src.replica,
                message=line,
                level=level,
                stream=stream,
                release=src.release,
                function=src.function,
                replica=src.replica,
            )
        )

"""The sync fast lane: ``f.remote()`` on a connection driven by the calling thread itself.

The client's main connection lives on an event loop in a background thread (``duanflow._client``), so a sync call
hands the invocation to that thread and waits for the thread to hand the result back: two thread wake-ups per
call, about a third of a warm call's latency on a small machine. The lane is a second connection on a private
event loop that is not running between calls: the thread making a sync call runs that loop itself
(``run_until_complete``) for as long as the call lasts, so the publish and the result's arrival happen on the
caller's own thread. One thread uses it at a time; a sync call made while another thread holds it takes the
ordinary path.

The durability is that of the ordinary path (``Client.send`` with ``confirm=False``): the invocation carries
``Nats-Msg-Id`` = its call id; a call without its result after :data:`CONFIRM_AFTER_S` publishes it again asking
for JetStream's PubAck (de-duplication stores it at most once), so a refused or lost publish fails within
:data:`PUBLISH_TIMEOUT_S` more; after a reconnect the call is published again under a fresh id.

Between calls nothing reads the connection. A lane idle for longer than :data:`IDLE_CHECK_S` proves it is
alive with a ping before the next publish; when that fails the lane is closed and the call goes the ordinary way
(nothing was published on the lane yet).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
from typing import Any, Final

import nats
import nats.errors
from duanflow_proto.messages.invocation import HDR_CALL_ID, HDR_REPLY
from nats.aio.msg import Msg

from duanflow import _telemetry
from duanflow._errors import UnavailableError
from duanflow._inbox import publish_now, subscribe_direct

log = logging.getLogger("duanflow.lane")

CONFIRM_AFTER_S: Final = 1.0
"""A call without its result after this long has its publish confirmed (the lane's and ``Client.send``'s)."""
PUBLISH_TIMEOUT_S: Final = 10.0
"""How long a publish waits for its PubAck (the lane's confirming one, and the client's)."""
IDLE_CHECK_S: Final = 20.0
"""A lane unused this long pings the server before it publishes."""
PING_TIMEOUT_S: Final = 2.0
CONNECT_TIMEOUT_S: Final = 5.0
RETRY_AFTER_S: Final = 30.0
"""After a lane could not connect, sync calls take the ordinary path this long before it is tried again."""
HDR_MSG_ID: Final = "Nats-Msg-Id"
"""JetStream's de-duplication header."""
ACK_SUFFIX: Final = ".ack"


class LaneUnavailable(Exception):
    """The lane cannot take this call and published nothing: use the ordinary path."""


class Refused(Exception):
    """JetStream refused the confirming publish: ``status`` is the PubAck's status header, ``data`` its body."""

    def __init__(self, status: str, data: bytes) -> None:
        super().__init__(status)
        self.status = status
        self.data = data


class Lane:
    """A connection for sync calls, driven by whichever thread holds :attr:`lock`."""

    def __init__(self, url: str, user: str, password: str) -> None:
        self._login = (url, user, password)
        self.lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._nc: Any = None
        self._inbox = ""
        self._pid = os.getpid()
        self._last_used = 0.0
        self._retry_at = 0.0
        self._waiting: dict[str, _Call] = {}
        self._generation = 0

    def usable(self) -> bool:
        """Whether a call may try the lane now (not after a failed connect, not in a forked child)."""
        return self._pid == os.getpid() and time.monotonic() >= self._retry_at

    def call(self, subject: str, body: bytes, call_id: str, wait_s: float, what: str) -> bytes:
        """Publish one invocation and return its raw Result; the caller holds :attr:`lock`.

        Raises :class:`LaneUnavailable` (nothing published), :class:`TimeoutError` after ``wait_s``,
        :class:`Refused` when JetStream refused the publish, or :class:`UnavailableError` when its PubAck is overdue.
        """
        loop = self._loop
        if loop is None or loop.is_closed():
            loop = self._loop = asyncio.new_event_loop()
        task = loop.create_task(self._call(subject, body, call_id, wait_s, what))
        try:
            return loop.run_until_complete(task)
        except BaseException:
            if not task.done():  # interrupted (Ctrl-C): end the call's task before the loop stops for good
                task.cancel()
                with contextlib.suppress(BaseException):
                    loop.run_until_complete(task)
            raise

    async def _call(self, subject: str, body: bytes, key: str, wait_s: float, what: str) -> bytes:
        await self._ready()
        headers = {HDR_REPLY: f"{self._inbox}.{key}", HDR_CALL_ID: key, HDR_MSG_ID: key}
        _telemetry.inject(headers)  # the task runs in a copy of the caller's context: its current span
        loop = asyncio.get_running_loop()
        now = loop.time()
        call = _Call(loop, subject, body, headers, now + wait_s)
        self._waiting[key] = call
        try:
            nc = self._nc
            try:
                if not publish_now(nc, subject, body, headers):
                    await nc.publish(subject, body, headers=headers)
            except (OSError, nats.errors.Error) as exc:  # refused before anything was sent
                log.info("sync lane could not publish (%r): taking the ordinary path", exc)
                await self._drop()
                raise LaneUnavailable from None
            data = await call.wait(now + min(CONFIRM_AFTER_S, wait_s))
            if data is not None:
                return data
            if loop.time() < call.deadline:
                # No result yet: the same message again (stored at most once), now asking for its PubAck.
                await nc.publish(subject, body, reply=f"{self._inbox}.{key}{ACK_SUFFIX}", headers=headers)
                data = await call.wait(min(call.deadline, loop.time() + PUBLISH_TIMEOUT_S))
                if data is not None:
                    return data
                if not call.acked and loop.time() < call.deadline:
                    raise UnavailableError(
                        f"JetStream did not acknowledge the invocation of {what} within {PUBLISH_TIMEOUT_S:g}s"
                    )
                data = await call.wait(call.deadline)
                if data is not None:
                    return data
            raise TimeoutError
        finally:
            del self._waiting[key]
            self._last_used = time.monotonic()

    async def _ready(self) -> None:
        """Connect on first use; after a long idle, prove the connection alive. Raises :class:`LaneUnavailable`."""
        if self._nc is not None and not self._nc.is_closed:
            if time.monotonic() - self._last_used < IDLE_CHECK_S and self._nc.is_connected:
                return
            try:
                await self._nc.flush(timeout=PING_TIMEOUT_S)
                return
            except Exception as exc:
                log.info("sync lane unusable after idling (%r): reconnecting", exc)
                await self._drop()
        try:
            url, user, password = self._login
            nc = await asyncio.wait_for(
                nats.connect(
                    servers=[url],
                    user=user or None,
                    password=password or None,
                    name=f"duanflow-sdk-{os.getpid()}-sync",
                    connect_timeout=CONNECT_TIMEOUT_S,
                    allow_reconnect=True,
                    max_reconnect_attempts=-1,
                    reconnect_time_wait=0.5,
                    reconnected_cb=self._on_reconnected,
                    error_cb=_quiet,
                ),
                CONNECT_TIMEOUT_S,
            )
            self._inbox = nc.new_inbox()
            await subscribe_direct(nc, f"{self._inbox}.>", self._on_message)
        except Exception as exc:
            log.info("sync lane could not connect (%r): sync calls take the ordinary path", exc)
            self._retry_at = time.monotonic() + RETRY_AFTER_S
            raise LaneUnavailable from None
        self._nc = nc

    def _on_message(self, msg: Msg) -> None:
        rest = msg.subject[len(self._inbox) + 1 :]
        if rest.endswith(ACK_SUFFIX):
            call = self._waiting.get(rest[: -len(ACK_SUFFIX)])
            if call is not None:
                call.on_ack(msg)
            return
        call = self._waiting.get(rest)
        if call is not None:
            call.set(msg.data)

    async def _on_reconnected(self) -> None:
        """Results published while disconnected are lost: publish the waiting call again under a fresh id."""
        self._generation += 1
        for call in list(self._waiting.values()):
            headers = {**call.headers, HDR_MSG_ID: f"{call.headers[HDR_CALL_ID]}-r{self._generation}"}
            with contextlib.suppress(Exception):
                await self._nc.publish(call.subject, call.body, headers=headers)

    async def _drop(self) -> None:
        nc, self._nc = self._nc, None
        if nc is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(nc.close(), PING_TIMEOUT_S)

    def close(self) -> None:
        """Close the connection and the loop (the caller holds :attr:`lock`, or no thread uses the lane)."""
        loop, self._loop = self._loop, None
        if loop is None or loop.is_closed() or self._pid != os.getpid():
            return
        with contextlib.suppress(Exception):
            loop.run_until_complete(self._drop())
        loop.close()


class _Call:
    """One call on the lane: its message (to publish again), and the result once in."""

    __slots__ = ("acked", "body", "data", "deadline", "error", "headers", "loop", "subject", "waiter")

    def __init__(
        self, loop: asyncio.AbstractEventLoop, subject: str, body: bytes, headers: dict[str, str], deadline: float
    ) -> None:
        self.loop = loop
        self.subject = subject
        self.body = body
        self.headers = headers
        self.deadline = deadline
        self.acked = False
        self.data: bytes | None = None
        self.error: Refused | None = None
        self.waiter: asyncio.Future[None] | None = None

    def set(self, data: bytes) -> None:
        """The result (the first one counts)."""
        if self.data is None:
            self.data = data
            self._wake()

    def on_ack(self, msg: Msg) -> None:
        """The confirming publish's PubAck: stored (nothing to do), or refused (the call fails)."""
        status = (msg.headers or {}).get("Status", "")
        if status or b'"error"' in msg.data:
            self.error = Refused(status, msg.data)
            self._wake()
        else:
            self.acked = True

    def _wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    async def wait(self, until: float) -> bytes | None:
        """The result, or None once ``until`` (loop time) passes without it; raises :class:`Refused`."""
        if self.data is None and self.error is None:
            waiter = self.waiter = self.loop.create_future()
            timer = self.loop.call_at(until, _wake, waiter)
            try:
                await waiter
            finally:
                timer.cancel()
                self.waiter = None
        if self.data is None and self.error is not None:
            raise self.error
        return self.data


def _wake(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


async def _quiet(exc: Exception) -> None:
    log.debug("sync lane: %r", exc)

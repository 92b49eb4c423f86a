"""Invocations over JetStream with results on one inbox, and the route table watched from the routes KV bucket."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any, Final

from duanflow_kit import telemetry
from duanflow_proto import codec, subjects
from duanflow_proto.errors import DeadlineExceededError, DuanFlowError, InvalidInputError, UnavailableError
from duanflow_proto.messages.invocation import (
    HDR_BUSY,
    HDR_CALL_ID,
    HDR_DEADLINE,
    HDR_REPLY,
    HEARTBEAT_S,
    Invocation,
    Result,
)
from duanflow_proto.messages.logs import LogLine
from duanflow_proto.messages.release import RouteEntry
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.transport import TcpTransport
from nats.js import JetStreamContext
from nats.protocol import command

from duanflow_gateway.domain import BadGatewayError, RouteTable

log = logging.getLogger("duanflow.gateway.nats")

PUBLISH_TIMEOUT_S = 5.0
"""How long the confirming publish of a call may wait for its PubAck (503 after)."""
CONFIRM_AFTER_S = 1.0
"""A call that heard nothing from a replica this long has its publish confirmed (see :meth:`NatsInvoker.invoke`)."""
WATCH_RETRY_S = 1.0
LOG_FLUSH_S: Final = 0.05
"""Longest a request log line waits to be sent with others."""
LOG_BATCH: Final = 256
"""Queued request log lines that are sent at once, without waiting for :data:`LOG_FLUSH_S`."""
HDR_MSG_ID: Final = "Nats-Msg-Id"
"""JetStream's de-duplication header (NATS's own name, not a DuanFlow subject)."""


class NatsInvoker:
    """:class:`duanflow_gateway.ports.Invoker`: JetStream publish, results demultiplexed from one inbox by call id.

    The invocation is published without asking for a PubAck, carrying ``Nats-Msg-Id`` = the call id: a fast call
    costs no ack message (one fewer wake-up of the gateway per request). Any message from a replica proves the
    stream stored it. Only a call that heard nothing within :data:`CONFIRM_AFTER_S` (no replica yet, a queue, a lost
    publish) has the same message published again, this time with its PubAck addressed to ``<inbox>.<call>.ack``:
    JetStream's de-duplication stores it at most once, and the ack says it is stored, or why not (503), within
    :data:`PUBLISH_TIMEOUT_S` more. The durability is the same as waiting for the ack first; a failure shows a second
    later.
    A call's messages (heartbeats, stream chunks, the result) queue up per call id. Once a replica has been heard
    from, silence longer than :data:`LIVENESS_S` means it died mid-request (502), not that it is slow.

    The fast path: given the endpoint's ``direct`` subject, the call is first published there (core NATS, the
    replicas' queue group), its reply subject ``<inbox>.<call>.ack``. A replica with a free slot runs it at once and
    answers on the inbox as above, with no stream, no consumer and no ack on the way. A replica that cannot take it
    (all slots busy, draining) answers ``Df-Busy``, and with no replica subscribed the server answers 503 (no
    responders); either way nothing runs, and the call goes to the stream as described above (where the router
    sees the backlog and scales up, or from zero).
    """

    def __init__(self, nc: NatsClient, js: JetStreamContext) -> None:
        self.nc = nc
        self.js = js
        self._prefix = ""
        self._sub: Any = None
        self._pending: dict[str, _Call] = {}

    @property
    def in_flight(self) -> int:
        """Calls waiting for their result."""
        return len(self._pending)

    async def start(self) -> None:
        """Subscribe to this gateway's inbox (``_INBOX.<nuid>.>``: results and PubAcks)."""
        self._prefix = self.nc.new_inbox()
        self._sub = await subscribe_direct(self.nc, f"{self._prefix}.>", self._on_result)

    async def stop(self) -> None:
        """Unsubscribe; calls still waiting fail as unavailable."""
        if self._sub is not None:
            await self._sub.unsubscribe()
            self._sub = None
        for call in self._pending.values():
            call.push(_STOPPED)

    def _on_result(self, msg: Msg) -> None:
        rest = msg.subject[len(self._prefix) + 1 :]
        if rest.endswith(_ACK_SUFFIX):
            call = self._pending.get(rest[: -len(_ACK_SUFFIX)])
            if call is not None:
                call.on_ack(msg)
            return
        call = self._pending.get(rest)
        if call is not None:
            call.push(msg.data)

    async def invoke(
        self,
        subject: str,
        invocation: Invocation,
        timeout_s: float,
        trace_parent: Mapping[str, str] | None = None,
        *,
        direct: str = "",
    ) -> Result:
        """Publish ``invocation`` and wait up to ``timeout_s`` for its first answer.

        ``trace_parent``: the incoming request's headers; a W3C ``traceparent`` there is continued (the invoke span
        is its child, and the context travels on in the NATS headers). ``direct``: the endpoint's warm replicas'
        subject, tried before ``subject`` (see the class).

        When that answer opens a stream (``stream`` and not ``final``), the call stays open: read the rest with
        :meth:`next` and end with :meth:`close`. Otherwise the call is closed already.
        """
        if self._sub is None:
            raise UnavailableError("the gateway is not connected to NATS yet")
        loop = asyncio.get_running_loop()
        call_id = invocation.call_id
        headers = {
            HDR_REPLY: f"{self._prefix}.{call_id}",
            HDR_CALL_ID: call_id,
            HDR_DEADLINE: str(invocation.deadline_ms),
            HDR_MSG_ID: call_id,
        }
        span = telemetry.start_client_span(f"invoke {invocation.function}", headers, parent=trace_parent)
        data = codec.encode(invocation)
        call = _Call(invocation, loop.time() + timeout_s, timeout_s, subject, data, headers)
        self._pending[call_id] = call
        keep = False
        try:
            # A lone request's call goes straight to the socket (a loop turn sooner); under load the flusher
            # sends many together.
            lone = len(self._pending) == 1
            if direct:
                call.direct = True
                call.acked = True  # nothing to confirm: a replica took it, or Df-Busy / 503 sends it to the stream
                ack = subjects.pub_ack(headers[HDR_REPLY])
                if not (lone and publish_now(self.nc, direct, data, headers, reply=ack)):
                    await self.nc.publish(direct, data, reply=ack, headers=headers)
            elif not (lone and publish_now(self.nc, subject, data, headers)):
                await self.nc.publish(subject, data, headers=headers)
            result = await self.next(call_id)
            keep = result.stream and not result.final
            return result
        finally:
            telemetry.end_span(span)
            if not keep:
                self._pending.pop(call_id, None)

    async def next(self, call_id: str) -> Result:
        """The call's next message that is not a heartbeat (deadline: 504; no ack: 503; replica silent: 502)."""
        call = self._pending.get(call_id)
        if call is None:
            raise BadGatewayError(f"call {call_id} is not open")
        loop = asyncio.get_running_loop()
        while True:
            data = call.pop()
            if data is None:
                now = loop.time()
                if call.acked or call.heard:
                    wait_until = min(call.deadline, now + LIVENESS_S) if call.heard else call.deadline
                else:
                    wait_until = min(call.deadline, call.ack_by)
                data = await call.wait(loop, wait_until)
                if data is None:
                    continue
            if data is _TIMEOUT:
                now = loop.time()
                if now >= call.deadline:
                    raise DeadlineExceededError(
                        f"{call.invocation.function} did not answer within {call.timeout_s:g}s",
                        details={"function": call.invocation.function, "call_id": call_id},
                    )
                if not call.acked and not call.heard:
                    if call.confirming:
                        raise UnavailableError("the invocations stream did not acknowledge the call in time")
                    await self._confirm(call)
                    continue
                if not call.heard or now < call.last_heard + LIVENESS_S:
                    continue
                raise BadGatewayError(
                    f"the replica running {call.invocation.function} stopped answering mid-request "
                    f"(silent for {LIVENESS_S:g}s): it probably crashed",
                    details={"function": call.invocation.function, "call_id": call_id},
                )
            if data is _TO_STREAM:
                await self._to_stream(call)
                continue
            if data is _STOPPED:
                raise UnavailableError("the gateway is shutting down")
            if isinstance(data, DuanFlowError):
                raise data
            try:
                result = codec.decode(data, Result)
            except DuanFlowError as exc:
                raise BadGatewayError(f"the replica answered {call_id} with garbage: {exc.message}") from None
            call.heard = True
            call.last_heard = loop.time()
            if result.heartbeat:
                continue
            return result

    def close(self, call_id: str) -> None:
        """Forget a call (its remaining messages are dropped)."""
        self._pending.pop(call_id, None)

    async def _to_stream(self, call: _Call) -> None:
        """No replica took the direct call: publish it to the stream, as a call without a direct path goes."""
        call.direct = False
        call.acked = False
        call.ack_by = asyncio.get_running_loop().time() + CONFIRM_AFTER_S
        await self._publish(call)

    async def _confirm(self, call: _Call) -> None:
        """Publish the call again (same ``Nats-Msg-Id``: stored at most once), now asking for its PubAck."""
        call.confirming = True
        call.ack_by = asyncio.get_running_loop().time() + PUBLISH_TIMEOUT_S
        await self._publish(call, reply=subjects.pub_ack(call.headers[HDR_REPLY]))

    async def _publish(self, call: _Call, reply: str = "") -> None:
        """Publish ``call`` to its stream subject (503 when that fails)."""
        try:
            await self.nc.publish(call.subject, call.data, reply=reply, headers=call.headers)
        except Exception as exc:
            raise UnavailableError(f"could not publish the call to {call.subject}: {exc}") from None


_STOPPED: Final = object()
_TIMEOUT: Final = object()
_TO_STREAM: Final = object()
"""Queued for a direct call no replica took (``Df-Busy``, or no responders): it goes to the stream."""
_ACK_SUFFIX: Final = subjects.PUB_ACK_SUFFIX
LIVENESS_S: Final = 6 * HEARTBEAT_S
"""Silence after which a replica that was running a call is taken for dead."""


class _Call:
    """One call's inbox: messages in arrival order, one waiter at a time, no task per wait."""

    __slots__ = (
        "ack_by",
        "acked",
        "confirming",
        "data",
        "deadline",
        "direct",
        "headers",
        "heard",
        "invocation",
        "last_heard",
        "queue",
        "subject",
        "timeout_s",
        "waiter",
    )

    def __init__(
        self,
        invocation: Invocation,
        deadline: float,
        timeout_s: float,
        subject: str,
        data: bytes,
        headers: dict[str, str],
    ) -> None:
        self.invocation = invocation
        self.deadline = deadline
        self.timeout_s = timeout_s
        self.subject = subject
        self.data = data
        self.headers = headers
        self.ack_by = deadline - timeout_s + min(CONFIRM_AFTER_S, timeout_s)
        """Until the confirming publish: when to send it; after: when its PubAck is overdue."""
        self.confirming = False
        self.direct = False
        """Published to the endpoint's direct subject, and not (yet) to the stream."""
        self.acked = False
        self.heard = False
        self.last_heard = 0.0
        self.queue: deque[Any] = deque()
        self.waiter: asyncio.Future[None] | None = None

    def push(self, item: Any) -> None:
        self.queue.append(item)
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    def pop(self) -> Any:
        return self.queue.popleft() if self.queue else None

    def on_ack(self, msg: Msg) -> None:
        """The stream's PubAck (or the server's 503 when no stream takes the subject); for a direct call, the
        replica's ``Df-Busy`` or the server's 503 (no responders): nothing runs it, it goes to the stream."""
        headers = msg.headers or {}
        if self.direct:
            if headers.get(HDR_BUSY) or headers.get("Status") == "503":
                self.push(_TO_STREAM)
            return
        if headers.get("Status") == "503" or (not msg.data and headers.get("Status")):
            self.push(UnavailableError(f"the invocations stream does not take {self.subject}"))
            return
        if msg.data.startswith(b'{"error"') or b'"error":' in msg.data[:64]:
            self.push(UnavailableError(f"the invocations stream refused the call: {msg.data[:200]!r}"))
            return
        self.acked = True  # no wake-up: the waiter's timer (ack_by) sees it, and waking costs a loop turn per call

    async def wait(self, loop: asyncio.AbstractEventLoop, until: float) -> Any:
        waiter = self.waiter = loop.create_future()
        timer = loop.call_at(until, _expire, waiter)
        try:
            await waiter
        finally:
            timer.cancel()
            self.waiter = None
        item = self.pop()
        return _TIMEOUT if item is None and loop.time() >= until else item


def _expire(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


class _DirectQueue:
    """Stands in for a subscription's pending queue: ``put_nowait`` runs the handler at once, in the read loop.

    nats-py hands each message of a callback subscription to a per-subscription task through an ``asyncio.Queue``
    (a put, a task wake-up and a coroutine call per message); on the result path that hop costs as much as the rest
    of the handling. The handler must not block; an exception is logged and the message dropped. (The SDK's
    ``duanflow._inbox`` does the same for callers; services do not import the SDK.)
    """

    __slots__ = ("_handler", "_sub")

    def __init__(self, sub: Any, handler: Callable[[Msg], None]) -> None:
        self._sub = sub
        self._handler = handler

    def put_nowait(self, msg: Msg) -> None:
        self._sub._pending_size -= len(msg.data)
        try:
            self._handler(msg)
        except Exception:
            log.exception("handler of %s failed; message dropped", msg.subject)

    def empty(self) -> bool:
        return True

    def qsize(self) -> int:
        return 0

    def task_done(self) -> None:
        return None

    async def join(self) -> None:
        return None


async def subscribe_direct(nc: NatsClient, subject: str, handler: Callable[[Msg], None]) -> Any:
    """Subscribe ``handler`` (a plain function) to ``subject``, falling back to a callback subscription when
    nats-py's internals are not what :class:`_DirectQueue` expects."""
    sub: Any = await nc.subscribe(subject, pending_bytes_limit=0)
    if hasattr(sub, "_pending_queue") and hasattr(sub, "_pending_size") and getattr(sub, "_cb", None) is None:
        sub._pending_queue = _DirectQueue(sub, handler)
        return sub
    await sub.unsubscribe()

    async def cb(msg: Msg) -> None:
        try:
            handler(msg)
        except Exception:
            log.exception("handler of %s failed; message dropped", msg.subject)

    return await nc.subscribe(subject, cb=cb)


def publish_now(nc: NatsClient, subject: str, payload: bytes, headers: dict[str, str], *, reply: str = "") -> bool:
    """Write one message straight to the socket when nothing is queued or unsent before it (order holds).

    ``nc.publish`` queues the command for nats-py's flusher task, which writes it a loop turn later; on the request
    path that turn is worth skipping. False (nothing sent) when the connection is not a plain connected TCP one or
    other commands wait: use ``nc.publish`` then. ``headers`` are the gateway's own (ids, inbox, trace context).
    (The SDK's ``duanflow._inbox.publish_now`` does the same for callers; services do not import the SDK.)
    """
    transport: Any = getattr(nc, "_transport", None)
    if type(transport) is not TcpTransport or nc._pending_data_size or not nc.is_connected:
        return False
    writer = transport._io_writer
    if writer is None or writer.transport.get_write_buffer_size():
        return False
    hdr = "".join([f"{k}: {v}\r\n" for k, v in headers.items()])
    writer.write(command.hpub_cmd(subject, reply, f"NATS/1.0\r\n{hdr}\r\n".encode(), payload))
    nc.stats["out_msgs"] += 1
    nc.stats["out_bytes"] += len(payload)
    return True


class NatsRequestLog:
    """:class:`duanflow_gateway.ports.RequestLog`: core publishes the logs stream captures (no ack round trip).

    Lines are kept and sent together every :data:`LOG_FLUSH_S` (or once :data:`LOG_BATCH` wait): one socket write
    for many requests instead of one each, off the request path. :meth:`close` sends what is left.
    """

    def __init__(self, nc: NatsClient) -> None:
        self.nc = nc
        self.lost = 0
        """Lines that could not be sent."""
        self._lines: list[LogLine] = []
        self._timer: asyncio.TimerHandle | None = None
        self._flushing: set[asyncio.Task[None]] = set()
        self._subjects: dict[tuple[str, str, str, str], str] = {}

    async def publish(self, line: LogLine) -> None:
        """Queue one line (sent within :data:`LOG_FLUSH_S`); never raises."""
        self._lines.append(line)
        if len(self._lines) >= LOG_BATCH:
            await self.flush()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(LOG_FLUSH_S, self._flush_soon)

    def _flush_soon(self) -> None:
        self._timer = None
        task = asyncio.get_running_loop().create_task(self.flush())
        self._flushing.add(task)
        task.add_done_callback(self._flushing.discard)

    async def flush(self) -> None:
        """Send every queued line now; failures are counted, never raised."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        lines, self._lines = self._lines, []
        for line in lines:
            key = (line.env, line.app, line.kind, line.source)
            subject = self._subjects.get(key)
            if subject is None:
                subject = self._subjects[key] = subjects.logs(line.env, line.app, line.kind, line.source)
            try:
                await self.nc.publish(subject, codec.encode(line))
            except Exception as exc:
                self.lost += 1
                if self.lost == 1:
                    log.warning("could not publish a request log line: %r", exc)

    async def close(self) -> None:
        """Send what is queued (on shutdown)."""
        await self.flush()
        if self._flushing:
            await asyncio.gather(*self._flushing, return_exceptions=True)


class KvRoutes:
    """:class:`duanflow_gateway.ports.Routes` kept current by a watcher on the routes KV bucket.

    A gateway serves one env: it watches only the keys ``<env>.>`` (keys are ``<env>.<app>.<function>``), and an
    entry whose own ``env`` is another one is left out too (counted as refused).
    """

    def __init__(self, js: JetStreamContext, env: str = "main") -> None:
        self.js = js
        self.env = env
        self.table = RouteTable()
        self.ready = asyncio.Event()
        self._refused: dict[str, str] = {}

    @property
    def refused(self) -> int:
        """Entries currently left out of the table because they are unusable."""
        return len(self._refused)

    def apply(self, key: str, value: bytes | None) -> None:
        """One change of the bucket: a value (re)defines ``key``, ``None`` deletes it."""
        self._refused.pop(key, None)
        if value is None:
            self.table.remove(key)
            return
        try:
            entry = codec.decode(value, RouteEntry)
            if entry.env != self.env:
                raise InvalidInputError(f"its env is {entry.env!r}; this gateway serves env {self.env!r}")
            route = self.table.put(key, entry)
        except DuanFlowError as exc:
            # An unusable entry must not keep serving what the key held before: that release is gone.
            self.table.remove(key)
            self._refused[key] = exc.message
            log.warning("route %s left out: %s", key, exc.message)
            return
        log.info("route %s %s → %s", route.method, route.entry.path, route.entry.subject)

    async def run(self) -> None:
        """Watch the bucket until cancelled; sets :attr:`ready` once the current entries are loaded.

        A broken watch is started again; the entries it then loads replace the table, so keys removed meanwhile go.
        """
        while True:
            try:
                await self._watch()
            except Exception as exc:
                log.warning("route watch failed, watching again in %gs: %r", WATCH_RETRY_S, exc)
            await asyncio.sleep(WATCH_RETRY_S)

    async def _watch(self) -> None:
        kv = await self.js.key_value(subjects.KV_ROUTES)
        watcher = await kv.watch(f"{self.env}.>")
        seen: set[str] | None = set()
        try:
            async for entry in watcher:
                if entry is None:
                    if seen is not None:
                        for key in set(self.table.routes) - seen:
                            self.table.remove(key)
                        seen = None
                    self.ready.set()
                    continue
                if seen is not None:
                    seen.add(entry.key)
                deleted = entry.operation in ("DEL", "PURGE")
                self.apply(entry.key, None if deleted else (entry.value or b""))
        finally:
            with contextlib.suppress(Exception):
                await watcher.stop()  # type: ignore[no-untyped-call]

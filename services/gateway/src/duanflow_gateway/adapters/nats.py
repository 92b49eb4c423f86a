"""Invocations over JetStream with results on one inbox, and the route table watched from the routes KV bucket."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from duanflow_proto import codec, subjects
from duanflow_proto.errors import DeadlineExceededError, DuanFlowError, UnavailableError
from duanflow_proto.messages.invocation import HDR_CALL_ID, HDR_DEADLINE, HDR_REPLY, Invocation, Result
from duanflow_proto.messages.logs import LogLine
from duanflow_proto.messages.release import RouteEntry
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext
from nats.js.errors import NoStreamResponseError

from duanflow_gateway.domain import BadGatewayError, RouteTable

log = logging.getLogger("duanflow.gateway.nats")

PUBLISH_TIMEOUT_S = 5.0
WATCH_RETRY_S = 1.0


class NatsInvoker:
    """:class:`duanflow_gateway.ports.Invoker`: JetStream publish, results demultiplexed from one inbox by call id."""

    def __init__(self, nc: NatsClient, js: JetStreamContext) -> None:
        self.nc = nc
        self.js = js
        self._prefix = ""
        self._sub: Any = None
        self._pending: dict[str, asyncio.Future[bytes]] = {}

    @property
    def in_flight(self) -> int:
        """Calls waiting for their result."""
        return len(self._pending)

    async def start(self) -> None:
        """Subscribe to this gateway's inbox (``_INBOX.<nuid>.*``)."""
        self._prefix = self.nc.new_inbox()
        self._sub = await self.nc.subscribe(f"{self._prefix}.*", cb=self._on_result)

    async def stop(self) -> None:
        """Unsubscribe; calls still waiting fail as unavailable."""
        if self._sub is not None:
            await self._sub.unsubscribe()
            self._sub = None
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(UnavailableError("the gateway is shutting down"))

    async def _on_result(self, msg: Msg) -> None:
        fut = self._pending.get(msg.subject.rsplit(".", 1)[-1])
        if fut is not None and not fut.done():
            fut.set_result(msg.data)

    async def invoke(self, subject: str, invocation: Invocation, timeout_s: float) -> Result:
        """Publish ``invocation`` and wait up to ``timeout_s`` for its result."""
        if self._sub is None:
            raise UnavailableError("the gateway is not connected to NATS yet")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        fut: asyncio.Future[bytes] = loop.create_future()
        self._pending[invocation.call_id] = fut
        headers = {
            HDR_REPLY: f"{self._prefix}.{invocation.call_id}",
            HDR_CALL_ID: invocation.call_id,
            HDR_DEADLINE: str(invocation.deadline_ms),
        }
        try:
            try:
                await self.js.publish(
                    subject, codec.encode(invocation), headers=headers, timeout=min(PUBLISH_TIMEOUT_S, timeout_s)
                )
            except NoStreamResponseError:
                raise UnavailableError(
                    f"the invocations stream does not take {subject}", details={"subject": subject}
                ) from None
            except (NatsTimeoutError, TimeoutError):
                raise UnavailableError("the invocations stream did not acknowledge the call in time") from None
            try:
                data = await asyncio.wait_for(fut, max(0.0, deadline - loop.time()))
            except TimeoutError:
                raise DeadlineExceededError(
                    f"{invocation.function} did not answer within {timeout_s:g}s",
                    details={"function": invocation.function, "call_id": invocation.call_id},
                ) from None
        finally:
            self._pending.pop(invocation.call_id, None)
        try:
            return codec.decode(data, Result)
        except DuanFlowError as exc:
            raise BadGatewayError(f"the replica answered {invocation.call_id} with garbage: {exc.message}") from None


class NatsRequestLog:
    """:class:`duanflow_gateway.ports.RequestLog`: core publishes the logs stream captures (no ack round trip)."""

    def __init__(self, nc: NatsClient) -> None:
        self.nc = nc
        self.lost = 0
        """Lines that could not be sent."""

    async def publish(self, line: LogLine) -> None:
        """Send one line; failures are counted, never raised."""
        try:
            await self.nc.publish(subjects.logs(line.env, line.app, line.kind, line.source), codec.encode(line))
        except Exception as exc:
            self.lost += 1
            if self.lost == 1:
                log.warning("could not publish a request log line: %r", exc)


class KvRoutes:
    """:class:`duanflow_gateway.ports.Routes` kept current by a watcher on the routes KV bucket."""

    def __init__(self, js: JetStreamContext) -> None:
        self.js = js
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
            route = self.table.put(key, codec.decode(value, RouteEntry))
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
        watcher = await kv.watchall()
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

"""One shape for every service process: a FastStream NATS broker, a JetStream connection, a health
responder, request handlers in queue groups (so instances scale out), and a clean SIGTERM drain."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any, TypeVar

import msgspec
import nats
from duanflow_proto import subjects
from duanflow_proto.messages import ErrorReply, HealthReply, HealthRequest
from faststream import FastStream
from faststream.nats import NatsBroker, NatsMessage
from faststream.security import SASLPlaintext
from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext

from duanflow_kit import telemetry
from duanflow_kit.handlers import handle
from duanflow_kit.settings import BaseSettings, otlp_endpoint

Req = TypeVar("Req")

log = logging.getLogger("duanflow.service")

CANCEL_STOP_S = 20.0
"""How long a cancelled service gets to shut down the way SIGTERM does before it is cancelled outright."""

ERROR_TAG = str(ErrorReply.__struct_config__.tag).encode()
"""Marks an encoded error reply (counted as outcome ``error``)."""


async def stop_tasks(*tasks: asyncio.Task[Any] | None, again_s: float = 1.0) -> None:
    """Cancel ``tasks`` and wait until every one has ended, cancelling again each ``again_s`` while one runs on.

    A single cancel is not enough: nats-py's publish path catches ``CancelledError`` while it waits for a flush, and
    Python 3.11's ``asyncio.wait_for`` (under nats-py's requests and asyncpg's queries) drops a cancel that arrives
    as its result does. A service loop whose cancel was dropped goes on looping, and keeps its task group, and so
    the service's shutdown, waiting for good.
    """
    pending = {t for t in tasks if t is not None and not t.done()}
    while pending:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=again_s)
    for ended in tasks:  # retrieve outcomes, so none is logged as "never retrieved"
        if ended is not None and not ended.cancelled():
            ended.exception()


def connect_options(settings: BaseSettings, name: str) -> dict[str, Any]:
    """nats-py connect keyword arguments for a settings object."""
    opts: dict[str, Any] = {
        "servers": settings.nats_url.split(","),
        "name": name,
        "max_reconnect_attempts": -1,
        "reconnect_time_wait": 0.5,
    }
    if settings.nats_user:
        opts["user"] = settings.nats_user
        opts["password"] = settings.nats_password
    return opts


async def connect(settings: BaseSettings, name: str) -> NatsClient:
    """Open a nats-py connection."""
    return await nats.connect(**connect_options(settings, name))


class Service:
    """A DuanFlow service: ``name``, its settings, its broker and its JetStream context."""

    def __init__(self, name: str, settings: BaseSettings) -> None:
        self.name = name
        self.settings = settings
        self.instance = settings.instance or f"{name}-{socket.gethostname()}-{uuid.uuid4().hex[:6]}"
        security = (
            SASLPlaintext(username=settings.nats_user, password=settings.nats_password) if settings.nats_user else None
        )
        self.broker = NatsBroker(
            settings.nats_url.split(","),
            security=security,
            name=self.instance,
            logger=None,
            max_reconnect_attempts=-1,
            reconnect_time_wait=1,
        )
        self._nc: NatsClient | None = None
        self._js: JetStreamContext | None = None
        self.health_checks: list[Callable[[], Awaitable[dict[str, str]]]] = []
        self.healthy = True
        self.request(subjects.health(name), HealthRequest)(self._health)

    @property
    def nc(self) -> NatsClient:
        """The service's own nats-py connection (JetStream, KV, raw publishes)."""
        assert self._nc is not None, "service not started"
        return self._nc

    @property
    def js(self) -> JetStreamContext:
        """JetStream context of :attr:`nc`."""
        assert self._js is not None, "service not started"
        return self._js

    def request(
        self, subject: str, req_type: type[Req], *, queue: str | None = None
    ) -> Callable[[Callable[[Req], Awaitable[msgspec.Struct]]], Callable[[Req], Awaitable[msgspec.Struct]]]:
        """Register a request/reply handler; instances share ``queue`` (default: the service name)."""

        def deco(fn: Callable[[Req], Awaitable[msgspec.Struct]]) -> Callable[[Req], Awaitable[msgspec.Struct]]:
            async def raw(msg: NatsMessage) -> bytes:
                started = time.perf_counter()
                with telemetry.handler_span(msg.headers, subject):
                    data = await handle(msg.body, req_type, fn, subject=subject)
                telemetry.metrics().observe(self.name, subject, time.perf_counter() - started, ERROR_TAG not in data)
                return data

            raw.__name__ = fn.__name__
            raw.__doc__ = fn.__doc__
            self.broker.subscriber(subject, queue=queue or self.name)(raw)
            return fn

        return deco

    async def _health(self, req: HealthRequest) -> HealthReply:
        details: dict[str, str] = {"instance": self.instance}
        ok = self.healthy
        for check in self.health_checks:
            try:
                details.update(await check())
            except Exception as exc:
                ok = False
                details["error"] = f"{type(exc).__name__}: {exc}"
        return HealthReply(service=self.name, instance=self.instance, ok=ok, pid=os.getpid(), details=details)

    @asynccontextmanager
    async def _lifespan(
        self, inner: Callable[[Service], AbstractAsyncContextManager[None]] | None
    ) -> AsyncIterator[None]:
        self._nc = await connect(self.settings, self.instance)
        self._js = self._nc.jetstream()
        port = self.settings.metrics_port
        scrape = await telemetry.serve_prometheus(port) if port else None
        try:
            if inner is None:
                yield
            else:
                async with inner(self):
                    yield
        finally:
            if scrape is not None:
                scrape.close()
            await self._nc.drain()

    async def run(self, lifespan: Callable[[Service], AbstractAsyncContextManager[None]] | None = None) -> None:
        """Run until SIGTERM/SIGINT; ``lifespan`` opens and closes the service's resources."""
        logging.basicConfig(
            level=self.settings.log_level.upper(),
            format=f"%(asctime)s %(levelname)s {self.name} %(name)s: %(message)s",
        )
        telemetry.setup(f"duanflow-{self.name}", otlp_endpoint())
        app = FastStream(self.broker, lifespan=lambda: self._lifespan(lifespan))
        log.info("%s starting (instance %s, nats %s)", self.name, self.instance, self.settings.nats_url)
        running = asyncio.ensure_future(app.run())
        try:
            await asyncio.shield(running)
        except asyncio.CancelledError:
            # Cancelled (an embedding program, a test): stop the way SIGTERM does. A cancel thrown into the app
            # itself can be lost on the way (see stop_tasks), leaving it running; the exit flag cannot be lost.
            app.exit()
            try:
                done, _ = await asyncio.wait({running}, timeout=CANCEL_STOP_S)
                if not done:
                    log.warning("%s still running %gs after its cancel: cancelling it", self.name, CANCEL_STOP_S)
                    running.cancel()
                    await asyncio.wait({running}, timeout=CANCEL_STOP_S)
            finally:
                if not running.done():  # cancelled again while stopping
                    running.cancel()
            if running.done() and not running.cancelled() and running.exception() is not None:
                log.warning("%s stopping after a cancel: %r", self.name, running.exception())
            raise
        log.info("%s stopped", self.name)


def main(coro: Awaitable[None]) -> None:
    """Entry point helper for ``python -m duanflow_<svc>``."""
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(coro)  # type: ignore[arg-type]

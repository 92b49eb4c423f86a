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

ERROR_TAG = str(ErrorReply.__struct_config__.tag).encode()
"""Marks an encoded error reply (counted as outcome ``error``)."""


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
        await app.run()
        log.info("%s stopped", self.name)


def main(coro: Awaitable[None]) -> None:
    """Entry point helper for ``python -m duanflow_<svc>``."""
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(coro)  # type: ignore[arg-type]

"""Wiring of the gateway process: the kit Service (NATS health, SIGTERM) and, in its lifespan, the route-table
watcher and the HTTP server (uvicorn serving the Litestar app in the same event loop)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import AsyncIterator, Iterator
from typing import Any

import uvicorn
from duanflow_kit.service import Service, stop_tasks
from duanflow_kit.streams import ensure_streams
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from duanflow_gateway.adapters.nats import KvRoutes, NatsInvoker, NatsRequestLog
from duanflow_gateway.handlers import build_http
from duanflow_gateway.settings import Settings

log = logging.getLogger("duanflow.gateway")

ROUTES_LOAD_TIMEOUT_S = 10.0
HTTP_START_TIMEOUT_S = 10.0


class _Server(uvicorn.Server):
    """uvicorn without its own signal handlers: the service's runner owns SIGTERM/SIGINT and stops us."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.serving = asyncio.Event()

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started:
            self.serving.set()


class _CoalescingTransport:
    """A transport whose writes of one event-loop turn leave in one ``send``.

    uvicorn writes a response's head and its body apart: two system calls and, with TCP_NODELAY, two segments the
    client wakes up for. Held until the end of the loop turn they become one (streamed chunks, written on later
    turns, still leave as they come). Everything else goes straight to the real transport.
    """

    __slots__ = ("_buffer", "_loop", "_transport")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._buffer: list[bytes] = []

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not self._buffer:
            self._loop.call_soon(self._flush)
        self._buffer.append(bytes(data))

    def _flush(self) -> None:
        if self._buffer:
            data = b"".join(self._buffer)
            self._buffer.clear()
            if not self._transport.is_closing():
                self._transport.write(data)

    def close(self) -> None:
        self._flush()
        self._transport.close()

    def abort(self) -> None:
        self._buffer.clear()
        self._transport.abort()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class _HttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol over a :class:`_CoalescingTransport`."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        coalescing = _CoalescingTransport(transport, asyncio.get_running_loop())
        super().connection_made(coalescing)  # type: ignore[arg-type]


def bind(host: str, port: int) -> socket.socket:
    """A bound TCP socket for ``host:port`` (port 0: a free one), so the port is known before serving."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # asyncio sets TCP_NODELAY only on accepted sockets whose proto says TCP, which this one's (0) does not; Linux
    # hands the listener's option to accepted sockets. Without it, every response (headers and body written apart)
    # waits ~40 ms for the client's delayed ACK (Nagle).
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


class GatewayApp:
    """The gateway service: :attr:`service` (NATS) plus the HTTP server its lifespan runs."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.service = Service("gateway", settings)
        self.http_port = 0
        """The port HTTP is served on, once started (useful with ``http_port=0``)."""
        self._routes: KvRoutes | None = None
        self._server: _Server | None = None
        self.service.health_checks.append(self._health)

    async def _health(self) -> dict[str, str]:
        if self._routes is None or self._server is None:
            return {"state": "starting"}
        if not self._server.started:
            raise RuntimeError("the HTTP server is not serving")
        return {
            "http": f"{self.settings.http_host}:{self.http_port}",
            "routes": str(len(self._routes.table)),
            "routes_refused": str(self._routes.refused),
            "routes_loaded": "yes" if self._routes.ready.is_set() else "no",
        }

    @contextlib.asynccontextmanager
    async def lifespan(self, service: Service) -> AsyncIterator[None]:
        """Ensure streams and buckets, load the route table, serve HTTP; on exit drain HTTP first."""
        s = self.settings
        await ensure_streams(service.js)
        sock = bind(s.http_host, s.http_port)
        self.http_port = sock.getsockname()[1]
        routes = KvRoutes(service.js, s.env)
        invoker = NatsInvoker(service.nc, service.js)
        request_log = NatsRequestLog(service.nc)
        await invoker.start()
        config = uvicorn.Config(
            build_http(
                routes,
                invoker,
                s,
                request_log,
                ready=lambda: routes.ready.is_set() and bool(service.nc.is_connected),
            ),
            log_config=None,
            access_log=False,
            http=_HttpProtocol,
            proxy_headers=False,  # nothing here reads the client's address: no middleware hop per request
            server_header=False,
            lifespan="off",
            timeout_graceful_shutdown=int(s.shutdown_grace_s),
        )
        server = _Server(config)
        try:
            async with asyncio.TaskGroup() as tg:
                watching = tg.create_task(routes.run(), name="gateway-routes")
                serving = tg.create_task(server.serve(sockets=[sock]), name="gateway-http")
                await _first(serving, server.serving, HTTP_START_TIMEOUT_S)
                if not server.started:
                    raise RuntimeError(f"the HTTP server did not start on {s.http_host}:{self.http_port}")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(routes.ready.wait(), ROUTES_LOAD_TIMEOUT_S)
                self._routes, self._server = routes, server
                log.info("gateway serving http://%s:%d (%d routes)", s.http_host, self.http_port, len(routes.table))
                try:
                    yield
                finally:
                    server.should_exit = True
                    await serving
                    await stop_tasks(watching)
        finally:
            self._routes = self._server = None
            await request_log.close()
            await invoker.stop()
            sock.close()

    async def run(self) -> None:
        """Run until SIGTERM/SIGINT."""
        await self.service.run(self.lifespan)


async def _first(task: asyncio.Task[None], event: asyncio.Event, timeout_s: float) -> None:
    """Wait until ``event`` is set, ``task`` ends, or ``timeout_s`` passes."""
    waiter = asyncio.ensure_future(event.wait())
    try:
        await asyncio.wait({task, waiter}, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiter.cancel()


def build_app(settings: Settings) -> GatewayApp:
    """The gateway service for ``settings``, ready to :meth:`GatewayApp.run`."""
    return GatewayApp(settings)

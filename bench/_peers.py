"""The peers the benches measure beside DuanFlow, in the same run: Ray (local, ``num_cpus=2``) and Celery with a
Redis broker. Each bench starts its own ``redis-server`` (Debian's package) on a free loopback port with its data in a
temporary directory, and stops it again. A peer that cannot run here (the ``peers`` extra not installed, no
``redis-server``) raises :class:`PeerUnavailable` with the reason, which the bench prints as a ``skipped`` line.

Install them with ``scripts/install.sh --peers`` (``make bench`` does).
"""

from __future__ import annotations

import contextlib
import importlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

INSTALL_HINT = "run `scripts/install.sh --peers` (or `make bench`) to install the peers"
START_TIMEOUT_S = 30.0


class PeerUnavailable(Exception):
    """A peer cannot be measured on this machine; the message says why."""


def free_port() -> int:
    """A free TCP port on the loopback interface."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def import_peer(name: str) -> ModuleType:
    """Import a peer's package, or :class:`PeerUnavailable`."""
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        raise PeerUnavailable(f"{name} is not installed ({exc}): {INSTALL_HINT}") from None


def _redis_ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


@contextlib.contextmanager
def redis_server() -> Iterator[str]:
    """A private ``redis-server`` (no persistence) on a free loopback port; yields its URL; stopped on exit."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise PeerUnavailable(f"redis-server is not installed (Debian: apt-get install redis-server): {INSTALL_HINT}")
    port = free_port()
    root = Path(tempfile.mkdtemp(prefix="duanflow-bench-redis-"))
    log = (root / "redis.log").open("wb")
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(root), "--save", "", "--appendonly", "no"],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not _redis_ping(port):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise PeerUnavailable(f"redis-server did not start: {(root / 'redis.log').read_text()[-500:]}")
            time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        shutil.rmtree(root, ignore_errors=True)


CELERY_APP = textwrap.dedent(
    """
    import os

    from celery import Celery

    app = Celery(
        "bench_celery_peer",
        broker=os.environ["DUANFLOW_BENCH_CELERY_BROKER"],
        backend=os.environ["DUANFLOW_BENCH_CELERY_BACKEND"] or None,
    )
    # As durable as a DuanFlow queue: a task is acked once it ran, not when a worker took it.
    app.conf.task_acks_late = os.environ.get("DUANFLOW_BENCH_CELERY_ACKS_LATE") == "1"
    app.conf.broker_connection_retry_on_startup = True
    app.conf.worker_hijack_root_logger = False


    @app.task(name="bench.echo")
    def echo(x):
        return x


    @app.task(name="bench.inc")
    def inc(x):
        return x + 1


    @app.task(name="bench.handle", ignore_result=True)
    def handle(job):
        return None
    """
)


@contextlib.contextmanager
def celery_app(
    broker: str, *, backend: str = "", pool: str = "prefork", concurrency: int = 2, acks_late: bool = False
) -> Iterator[Any]:
    """A Celery worker in a subprocess (``pool``, ``concurrency``) on ``broker``; yields the client's app module.

    The module has the tasks ``echo(x)``, ``inc(x)`` and ``handle(job)`` (returns nothing, no result stored).
    """
    import_peer("celery")
    workdir = Path(tempfile.mkdtemp(prefix="duanflow-bench-celery-"))
    (workdir / "bench_celery_peer.py").write_text(CELERY_APP, encoding="utf-8")
    settings = {
        "DUANFLOW_BENCH_CELERY_BROKER": broker,
        "DUANFLOW_BENCH_CELERY_BACKEND": backend,
        "DUANFLOW_BENCH_CELERY_ACKS_LATE": "1" if acks_late else "0",
    }
    env = {**os.environ, **settings, "PYTHONPATH": os.pathsep.join([str(workdir), os.environ.get("PYTHONPATH", "")])}
    log = (workdir / "worker.log").open("wb")
    worker = subprocess.Popen(
        [
            *(sys.executable, "-m", "celery", "-A", "bench_celery_peer", "worker"),
            *("--pool", pool, "-c", str(concurrency)),
            *("--loglevel", "WARNING", "--without-gossip", "--without-mingle", "--without-heartbeat"),
        ],
        cwd=workdir,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    saved = {k: os.environ.get(k) for k in settings}
    os.environ.update(settings)
    sys.path.insert(0, str(workdir))
    try:
        sys.modules.pop("bench_celery_peer", None)
        module = importlib.import_module("bench_celery_peer")
        if backend:
            try:
                module.echo.delay("up").get(timeout=60)  # the worker is up
            except Exception as exc:
                raise PeerUnavailable(
                    f"the Celery worker did not answer: {exc}; {(workdir / 'worker.log').read_text()[-500:]}"
                ) from None
        yield module
    finally:
        sys.path.remove(str(workdir))
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        worker.terminate()
        try:
            worker.wait(timeout=15)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()
        log.close()
        shutil.rmtree(workdir, ignore_errors=True)


@contextlib.contextmanager
def ray_local() -> Iterator[Any]:
    """A local Ray instance (2 CPUs, no dashboard); yields the ``ray`` module; shut down on exit."""
    ray = import_peer("ray")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    try:
        ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    except Exception as exc:
        raise PeerUnavailable(f"ray.init failed: {type(exc).__name__}: {exc}") from None
    try:
        yield ray
    finally:
        ray.shutdown()

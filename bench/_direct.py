"""A stack of just what invocations need, for the benches: a real NATS server (JetStream, per-role users), the
streams, each function's durable consumer (an ``@app.worker``'s queue consumer; both as the router creates them)
and replicas started as an agent starts them (``python -m duanflow._runtime`` with the env of docs/CONTRACTS.md).
No router, agent, Postgres or S3: what is measured is the invocation path itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import importlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import nats
from duanflow._local import servers
from duanflow._runtime.queue_worker import is_queue_worker
from duanflow_kit.streams import ensure_streams
from duanflow_proto import codec, subjects
from duanflow_proto.messages.common import Ack
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy


@dataclass
class Direct:
    """The running pieces; :meth:`start_replica` adds replicas."""

    root: Path
    nats: servers.Proc
    creds: servers.NatsCredentials
    env: str
    app_name: str
    module: ModuleType
    replicas: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def login(self) -> tuple[str, str, str]:
        """URL, user and password of the service role."""
        return self.nats.address, "service", self.creds.service

    def replica_env(self, function: str, replica_id: str) -> dict[str, str]:
        """The environment an agent starts a replica of ``function`` with."""
        spec = self.module.app._registry()[function].spec
        worker = is_queue_worker(spec)
        env = {k: v for k, v in os.environ.items() if not k.startswith("DUANFLOW_")}
        env.update(
            DUANFLOW_NATS_URL=self.nats.address,
            DUANFLOW_NATS_USER="agent",
            DUANFLOW_NATS_PASSWORD=self.creds.agent,
            DUANFLOW_REPLICA_ID=replica_id,
            DUANFLOW_ENV=self.env,
            DUANFLOW_APP=self.app_name,
            DUANFLOW_RELEASE="rel_20260101_0000",
            DUANFLOW_FUNCTION=function,
            DUANFLOW_MODULE=self.module.__name__,
            DUANFLOW_STREAM=subjects.STREAM_QUEUES if worker else subjects.STREAM_INVOCATIONS,
            DUANFLOW_CONSUMER=(
                subjects.queue_consumer(self.env, spec.queue or "")
                if worker
                else subjects.consumer_name(self.env, self.app_name, function)
            ),
            DUANFLOW_CONCURRENCY=str(spec.concurrency),
            DUANFLOW_TIMEOUT_S=repr(spec.timeout_s),
            CUDA_VISIBLE_DEVICES="",
            PYTHONPATH=os.pathsep.join([str(self.root / "app"), os.environ.get("PYTHONPATH", "")]),
        )
        return env

    def start_replica(self, function: str, *, wait: bool = True) -> subprocess.Popen[bytes]:
        """Start one replica of ``function``; with ``wait``, return once it announced readiness."""
        return asyncio.run(self._start(function, wait))

    async def _start(self, function: str, wait: bool) -> subprocess.Popen[bytes]:
        replica_id = f"rp-{uuid.uuid4().hex[:10]}"
        nc = await nats.connect(self.nats.address, user="agent", password=self.creds.agent)
        try:
            ready = asyncio.Event()

            async def on_ready(msg: Any) -> None:
                if codec.decode(msg.data, Ack).message == replica_id:
                    ready.set()

            await nc.subscribe(subjects.replica_ready(replica_id), cb=on_ready)
            await nc.flush()
            log = (self.root / f"{function}-{replica_id}.log").open("wb")
            proc = subprocess.Popen(
                [sys.executable, "-m", "duanflow._runtime"],
                cwd=self.root / "app",
                env=self.replica_env(function, replica_id),
                stdout=log,
                stderr=subprocess.STDOUT,
            )
            self.replicas.append(proc)
            deadline = time.monotonic() + 60
            while wait and not ready.is_set():
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"replica of {function} did not start: see {log.name}")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(ready.wait(), 0.1)
            return proc
        finally:
            await nc.close()


def consumer_config(env: str, app: str, spec: Any, ack_wait: float | None = None) -> ConsumerConfig:
    """The function's durable consumer, as the router creates it (docs/CONTRACTS.md); ``ack_wait`` overrides."""
    return ConsumerConfig(
        durable_name=subjects.consumer_name(env, app, spec.name),
        deliver_policy=DeliverPolicy.ALL,
        ack_policy=AckPolicy.EXPLICIT,
        ack_wait=ack_wait or spec.timeout_s + 30,
        max_deliver=spec.retries + 5,
        filter_subject=subjects.invocation(env, app, spec.name),
        max_ack_pending=100_000,
    )


def queue_consumer_config(env: str, spec: Any, ack_wait: float | None = None) -> ConsumerConfig:
    """An ``@app.worker``'s queue consumer, as the router creates it at deploy; ``ack_wait`` overrides."""
    from duanflow_router.adapters.nats import queue_consumer_config as router_config

    cfg = router_config(env, spec)
    return dataclasses.replace(cfg, ack_wait=ack_wait) if ack_wait else cfg


@contextlib.contextmanager
def direct(app_source: str, app_name: str, ack_wait: float | None = None) -> Iterator[Direct]:
    """NATS + streams + consumers for every function of ``app_source`` (a module defining ``app``).

    ``ack_wait`` shortens the consumers' lease (replicas heartbeat long inputs), so that inputs of a killed replica
    come back sooner than the router's ``timeout + 30 s``.
    """
    from duanflow import _client

    root = Path(tempfile.mkdtemp(prefix="duanflow-bench-direct-"))
    token = uuid.uuid4().hex[:8]
    (root / "app").mkdir()
    module_name = f"bench_app_{token}"
    (root / "app" / f"{module_name}.py").write_text(textwrap.dedent(app_source), encoding="utf-8")
    creds = servers.NatsCredentials.generate()
    proc = servers.start_nats(root / "nats", creds)
    env = f"b{token}"
    saved = {k: os.environ.get(k) for k in ("DUANFLOW_NATS_URL", "DUANFLOW_NATS_USER", "DUANFLOW_NATS_PASSWORD")}
    os.environ.update(DUANFLOW_NATS_URL=proc.address, DUANFLOW_NATS_USER="client", DUANFLOW_NATS_PASSWORD=creds.client)
    os.environ["DUANFLOW_ENV"] = env
    sys.path.insert(0, str(root / "app"))
    d: Direct | None = None
    try:
        module = importlib.import_module(module_name)
        d = Direct(root, proc, creds, env, app_name, module)
        asyncio.run(_setup(d, ack_wait))
        _client.reset_client()
        yield d
    finally:
        _client.reset_client()
        for rp in d.replicas if d else []:
            if rp.poll() is None:
                rp.kill()
                rp.wait(10)
        (d.nats if d else proc).stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        shutil.rmtree(root, ignore_errors=True)


def kill_9(proc: subprocess.Popen[bytes]) -> None:
    """``kill -9`` a replica (no drain, no goodbye) and reap it."""
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)


def restart_nats(d: Direct) -> None:
    """Stop the NATS server and start it again on the same port and store (file storage survives)."""
    port = int(d.nats.address.rsplit(":", 1)[1])
    d.nats.stop()
    d.nats = servers.start_nats(d.root / "nats", d.creds, port=port)


async def _setup(d: Direct, ack_wait: float | None) -> None:
    nc = await nats.connect(d.nats.address, user="service", password=d.creds.service)
    try:
        js = nc.jetstream()
        await ensure_streams(js)
        for fn in d.module.app._registry().values():
            if is_queue_worker(fn.spec):
                await js.add_consumer(subjects.STREAM_QUEUES, queue_consumer_config(d.env, fn.spec, ack_wait))
            else:
                await js.add_consumer(
                    subjects.STREAM_INVOCATIONS, consumer_config(d.env, d.app_name, fn.spec, ack_wait)
                )
    finally:
        await nc.close()

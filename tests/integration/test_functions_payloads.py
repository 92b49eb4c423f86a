"""Arguments and results over ~1 MiB travel through S3, with presigned URLs from a real router (Postgres, S3 and
NATS started by the session's fixtures), to a real replica: a 100 MiB argument and a 5 MiB result arrive intact, and
so do the large inputs and results of a ``.map()``."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import importlib
import os
import subprocess
import sys
import textwrap
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import nats
import pytest
from duanflow import _client
from duanflow_kit.streams import ensure_streams
from duanflow_proto import codec, subjects
from duanflow_proto.messages.common import Ack, HealthReply, HealthRequest
from duanflow_router.app import build_app
from duanflow_router.settings import Settings
from fixtures.waiting import eventually
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

pytestmark = pytest.mark.timeout(180)

APP_SOURCE = """
import hashlib

import duanflow as df

app = df.App("{app}")


@app.function(timeout=120)
def digest(data: bytes) -> tuple[int, str]:
    return len(data), hashlib.sha256(data).hexdigest()


@app.function(timeout=120)
def blob(n: int) -> bytes:
    return bytes(range(256)) * (n // 256)
"""


@pytest.fixture
async def router(infra: Any, unique: str, nc_service: Any) -> AsyncIterator[Settings]:
    settings = Settings(
        nats_url=infra.nats_url,
        nats_user="service",
        nats_password=infra.nats.service,
        database_url=infra.postgres_dsn,
        s3_endpoint=infra.s3_endpoint,
        s3_access_key=infra.s3.access_key,
        s3_secret_key=infra.s3.secret_key,
        s3_bucket=f"b{unique}",
        schema=f"router_{unique}",
        start_timeout_s=10.0,
        capacity_wait_s=0.0,
        tick_s=0.2,
    )
    app = build_app(settings)
    task = asyncio.create_task(app.run())

    async def healthy() -> bool:
        msg = await nc_service.request(subjects.health("router"), codec.encode(HealthRequest()), timeout=2)
        return codec.decode(msg.data, HealthReply).ok

    try:
        await eventually(healthy, timeout=30)
        yield settings
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await app.service.broker.stop()


async def test_large_arguments_and_results_travel_through_s3_in_calls_and_maps(
    router: Settings, infra: Any, unique: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    env, app_name, module_name = f"p{unique}", f"pl-{unique}", f"payload_app_{unique}"
    (tmp_path / f"{module_name}.py").write_text(textwrap.dedent(APP_SOURCE.format(app=app_name)))
    monkeypatch.syspath_prepend(str(tmp_path))
    for key, value in {
        "DUANFLOW_NATS_URL": infra.nats_url,
        "DUANFLOW_NATS_USER": "client",
        "DUANFLOW_NATS_PASSWORD": infra.nats.client,
        "DUANFLOW_ENV": env,
        "DUANFLOW_HOME": str(tmp_path / "home"),
    }.items():
        monkeypatch.setenv(key, value)
    module = importlib.import_module(module_name)
    _client.reset_client()
    procs: list[subprocess.Popen[bytes]] = []
    nc = await nats.connect(infra.nats_url, user="service", password=infra.nats.service)
    try:
        js = nc.jetstream()
        await ensure_streams(js)
        for fn in ("digest", "blob"):
            await js.add_consumer(
                subjects.STREAM_INVOCATIONS,
                ConsumerConfig(
                    durable_name=subjects.consumer_name(env, app_name, fn),
                    deliver_policy=DeliverPolicy.ALL,
                    ack_policy=AckPolicy.EXPLICIT,
                    ack_wait=150,
                    max_deliver=5,
                    filter_subject=subjects.invocation(env, app_name, fn),
                ),
            )
            replica_id = f"rp-{uuid.uuid4().hex[:10]}"
            ready = asyncio.Event()

            async def on_ready(msg: Any, rid: str = replica_id, ev: asyncio.Event = ready) -> None:
                if codec.decode(msg.data, Ack).message == rid:
                    ev.set()

            await nc.subscribe(subjects.replica_ready(replica_id), cb=on_ready)
            replica_env = {k: v for k, v in os.environ.items() if not k.startswith("DUANFLOW_")}
            replica_env.update(
                DUANFLOW_NATS_URL=infra.nats_url,
                DUANFLOW_NATS_USER="agent",
                DUANFLOW_NATS_PASSWORD=infra.nats.agent,
                DUANFLOW_REPLICA_ID=replica_id,
                DUANFLOW_ENV=env,
                DUANFLOW_APP=app_name,
                DUANFLOW_FUNCTION=fn,
                DUANFLOW_MODULE=module_name,
                DUANFLOW_STREAM=subjects.STREAM_INVOCATIONS,
                DUANFLOW_CONSUMER=subjects.consumer_name(env, app_name, fn),
                DUANFLOW_TIMEOUT_S="120",
                PYTHONPATH=os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]),
            )
            log = (tmp_path / f"{fn}.log").open("wb")
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "duanflow._runtime"],
                    cwd=tmp_path,
                    env=replica_env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            )

            async def is_ready(ev: asyncio.Event = ready, fn: str = fn) -> bool:
                assert procs[-1].poll() is None, (tmp_path / f"{fn}.log").read_text()
                return ev.is_set()

            await eventually(is_ready, timeout=30)
        # The router here has no release of the app (no agent to place it on): point the client at the subjects.
        client = _client.get_client()
        for name, fn_handle in module.app._registry().items():
            client._targets[(env, app_name, name)] = _client.Target(
                subjects.invocation(env, app_name, name), fn_handle.spec, app_name, env
            )
        big = os.urandom(1024) * (100 * 1024)  # 100 MiB
        assert await module.digest.remote.aio(big) == (len(big), hashlib.sha256(big).hexdigest())
        blob = await module.blob.remote.aio(5 * 2**20)
        assert blob == bytes(range(256)) * (5 * 2**20 // 256)
        # .map(): each input and each result over ~1 MiB goes through S3 on its own; the small ones stay inline.
        inputs = [b"small", os.urandom(9 * 2**20), b"", os.urandom(2**20 + 1)]  # 9 MiB: over any message
        digests = [r async for r in module.digest.map.aio(inputs)]
        assert digests == [(len(x), hashlib.sha256(x).hexdigest()) for x in inputs]
        sizes = [256, 9 * 2**20, 512, 2 * 2**20]
        blobs = [r async for r in module.blob.map.aio(sizes)]
        assert blobs == [bytes(range(256)) * (n // 256) for n in sizes]
    finally:
        _client.reset_client()
        await nc.close()
        for proc in procs:
            proc.kill()
            proc.wait(10)

"""``FunctionCall.cancel()`` against real replicas on a real NATS server: a queued call is skipped, a running
async call is stopped where it awaits, a running sync call's result is dropped and the replica keeps serving, a
finished call keeps its result, and another process sees the cancellation."""

from __future__ import annotations

import asyncio
import importlib
import subprocess
import textwrap
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import duanflow as df
import nats
import pytest
from duanflow import _client
from duanflow._local import servers
from duanflow_kit.streams import ensure_streams
from duanflow_proto import subjects
from fixtures.replicas import new_replica_id, replica_env, spawn_ready
from fixtures.waiting import eventually_sync
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

pytestmark = pytest.mark.timeout(90)

APP_SOURCE = """
import asyncio
import os
import time
from pathlib import Path

import duanflow as df

app = df.App("{app}")
MARKS = Path(os.environ["CANCEL_TEST_MARKS"])


@app.function(timeout=60)
async def asleep(seconds: float, key: str) -> str:
    (MARKS / f"{{key}}.start").touch()
    await asyncio.sleep(seconds)
    (MARKS / f"{{key}}.end").touch()
    return key


@app.function(timeout=60)
def ssleep(seconds: float, key: str) -> str:
    (MARKS / f"{{key}}.start").touch()
    time.sleep(seconds)
    (MARKS / f"{{key}}.end").touch()
    return key
"""


@dataclass
class Deployed:
    env: str
    app_name: str
    module: ModuleType
    nats_url: str
    creds: servers.NatsCredentials
    app_dir: Path
    marks: Path
    logs: Path
    replicas: list[subprocess.Popen[bytes]]


def _consumer(env: str, app: str, spec: Any) -> ConsumerConfig:
    return ConsumerConfig(
        durable_name=subjects.consumer_name(env, app, spec.name),
        deliver_policy=DeliverPolicy.ALL,
        ack_policy=AckPolicy.EXPLICIT,
        ack_wait=spec.timeout_s + 30,
        max_deliver=spec.retries + 5,
        filter_subject=subjects.invocation(env, app, spec.name),
        max_ack_pending=100_000,
    )


async def _setup(d: Deployed) -> None:
    nc = await nats.connect(d.nats_url, user="service", password=d.creds.service)
    try:
        js = nc.jetstream()
        await ensure_streams(js)
        for fn in d.module.app._registry().values():
            await js.add_consumer(subjects.STREAM_INVOCATIONS, _consumer(d.env, d.app_name, fn.spec))
    finally:
        await nc.close()
    for function in ("asleep", "ssleep"):
        replica_id = new_replica_id()
        env = replica_env(
            nats_url=d.nats_url,
            agent_password=d.creds.agent,
            spec=d.module.app._registry()[function].spec,
            env=d.env,
            app=d.app_name,
            module=d.module.__name__,
            app_dir=d.app_dir,
            replica_id=replica_id,
            CANCEL_TEST_MARKS=str(d.marks),
        )
        d.replicas.append(
            await spawn_ready(
                nats_url=d.nats_url,
                agent_password=d.creds.agent,
                replica_id=replica_id,
                env=env,
                cwd=d.app_dir,
                log_path=d.logs / f"{function}-{replica_id}.log",
            )
        )


@pytest.fixture(scope="module")
def deployed(
    nats_server: tuple[servers.Proc, servers.NatsCredentials], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Deployed]:
    token = uuid.uuid4().hex[:8]
    root = tmp_path_factory.mktemp("cancel")
    app_dir, marks, logs = root / "app", root / "marks", root / "logs"
    for p in (app_dir, marks, logs):
        p.mkdir()
    module_name = f"cancel_app_{token}"
    app_name = f"cx-{token}"
    (app_dir / f"{module_name}.py").write_text(textwrap.dedent(APP_SOURCE.format(app=app_name)))
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(app_dir))
        mp.setenv("DUANFLOW_NATS_URL", nats_server[0].address)
        mp.setenv("DUANFLOW_NATS_USER", "client")
        mp.setenv("DUANFLOW_NATS_PASSWORD", nats_server[1].client)
        mp.setenv("DUANFLOW_ENV", f"c{token}")
        mp.setenv("DUANFLOW_HOME", str(root / "home"))
        mp.setenv("CANCEL_TEST_MARKS", str(marks))
        module = importlib.import_module(module_name)
        _client.reset_client()
        d = Deployed(f"c{token}", app_name, module, nats_server[0].address, nats_server[1], app_dir, marks, logs, [])
        try:
            asyncio.run(_setup(d))
            yield d
        finally:
            _client.reset_client()
            for proc in d.replicas:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait(10)


def _wait_started(d: Deployed, key: str) -> None:
    eventually_sync(lambda: (d.marks / f"{key}.start").exists() or None, timeout=15)


def test_a_running_async_call_stops_where_it_awaits(deployed: Deployed) -> None:
    call = deployed.module.asleep.spawn(30, "a-run")
    _wait_started(deployed, "a-run")
    began = time.monotonic()
    call.cancel()
    with pytest.raises(df.CallCancelledError, match="cancelled"):
        call.get(timeout=10)
    assert time.monotonic() - began < 5
    # Another process (a fresh client: no local waiter) sees the cancellation through the platform.
    _client.reset_client()
    with pytest.raises(df.CallCancelledError):
        df.FunctionCall.from_id(call.object_id).get(timeout=10)
    assert deployed.module.asleep.remote(0, "a-after") == "a-after", "the replica keeps serving"
    assert not (deployed.marks / "a-run.end").exists()


def test_a_queued_call_is_skipped(deployed: Deployed) -> None:
    first = deployed.module.ssleep.spawn(1.5, "q-first")  # concurrency 1: the next call queues behind it
    queued = deployed.module.ssleep.spawn(0, "q-skipped")
    queued.cancel()
    assert first.get(timeout=20) == "q-first"
    with pytest.raises(df.CallCancelledError):
        queued.get(timeout=10)
    assert deployed.module.ssleep.remote(0, "q-after") == "q-after"
    assert not (deployed.marks / "q-skipped.start").exists(), "a cancelled call never reaches the function"


def test_a_running_sync_call_is_dropped_and_the_replica_serves_on(deployed: Deployed) -> None:
    call = deployed.module.ssleep.spawn(4, "s-run")
    _wait_started(deployed, "s-run")
    call.cancel()
    with pytest.raises(df.CallCancelledError):
        call.get(timeout=10)
    began = time.monotonic()
    assert deployed.module.ssleep.remote(0, "s-after") == "s-after"
    assert time.monotonic() - began < 3, "new inputs run on a fresh thread, not behind the detached one"


async def test_cancel_aio_and_a_finished_call_keeps_its_result(deployed: Deployed) -> None:
    call = await deployed.module.asleep.spawn.aio(0, "f-done")
    assert await call.get.aio(timeout=10) == "f-done"
    await call.cancel.aio()
    assert await df.FunctionCall.from_id(call.object_id).get.aio(timeout=10) == "f-done"

"""The queue control API and ``df.storage`` through a real router (Postgres, S3 and NATS from the session's
fixtures): a dead-lettered job is listed with its error, replayed, and then succeeds; ``duanflow queue`` shows it;
storage round-trips JSON and bytes through presigned URLs and refuses the platform's own keys."""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import json
import os
import subprocess
import sys
import textwrap
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import duanflow as df
import nats
import pytest
from duanflow import _client
from duanflow._cli.main import app as cli
from duanflow_kit.streams import ensure_streams
from duanflow_proto import codec, subjects
from duanflow_proto.messages.common import Ack, HealthReply, HealthRequest
from duanflow_router.adapters.nats import queue_consumer_config
from duanflow_router.app import build_app
from duanflow_router.settings import Settings
from fixtures.waiting import eventually
from typer.testing import CliRunner

pytestmark = pytest.mark.timeout(120)

APP_SOURCE = """
import os
from pathlib import Path

import duanflow as df

app = df.App("{app}")
MARKS = Path(os.environ["QUEUE_TEST_MARKS"])
jobs = df.Queue("{queue}", max_retries=1)


@app.worker(queue=jobs, timeout=10, retries=df.Retries(max_retries=0, initial_delay=0.05, max_delay=0.1))
def heals(job):
    if not (MARKS / "healed").exists():
        raise KeyError(f"not yet: {{job['n']}}")
    (MARKS / ("done-" + df.current_job_id())).write_text(str(job["n"]))
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


@pytest.fixture
def client_env(infra: Any, unique: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    env = f"e{unique}"
    for key, value in {
        "DUANFLOW_NATS_URL": infra.nats_url,
        "DUANFLOW_NATS_USER": "client",
        "DUANFLOW_NATS_PASSWORD": infra.nats.client,
        "DUANFLOW_ENV": env,
        "DUANFLOW_HOME": str(tmp_path / "home"),
    }.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("DUANFLOW_REPLICA_ID", raising=False)
    _client.reset_client()
    return env


async def _start_worker(infra: Any, env: str, module: Any, app_name: str, marks: Path, logs: Path) -> Any:
    spec = module.app._registry()["heals"].spec
    replica_id = f"rp-{uuid.uuid4().hex[:10]}"
    proc_env = {k: v for k, v in os.environ.items() if not k.startswith("DUANFLOW_")}
    proc_env.update(
        DUANFLOW_NATS_URL=infra.nats_url,
        DUANFLOW_NATS_USER="agent",
        DUANFLOW_NATS_PASSWORD=infra.nats.agent,
        DUANFLOW_REPLICA_ID=replica_id,
        DUANFLOW_ENV=env,
        DUANFLOW_APP=app_name,
        DUANFLOW_FUNCTION="heals",
        DUANFLOW_MODULE=module.__name__,
        DUANFLOW_STREAM=subjects.STREAM_QUEUES,
        DUANFLOW_CONSUMER=subjects.queue_consumer(env, spec.queue),
        DUANFLOW_TIMEOUT_S=repr(spec.timeout_s),
        QUEUE_TEST_MARKS=str(marks),
        PYTHONPATH=os.pathsep.join([str(Path(module.__file__).parent), os.environ.get("PYTHONPATH", "")]),
    )
    nc = await nats.connect(infra.nats_url, user="service", password=infra.nats.service)
    try:
        await ensure_streams(nc.jetstream())
        await nc.jetstream().add_consumer(subjects.STREAM_QUEUES, queue_consumer_config(env, spec))
        ready = asyncio.Event()

        async def on_ready(msg: Any) -> None:
            if codec.decode(msg.data, Ack).message == replica_id:
                ready.set()

        await nc.subscribe(subjects.replica_ready(replica_id), cb=on_ready)
        await nc.flush()
        log_path = logs / f"{replica_id}.log"
        proc = subprocess.Popen(
            [sys.executable, "-m", "duanflow._runtime"],
            cwd=str(Path(module.__file__).parent),
            env=proc_env,
            stdout=log_path.open("wb"),
            stderr=subprocess.STDOUT,
        )

        async def is_ready() -> bool:
            assert proc.poll() is None, log_path.read_text()
            return ready.is_set()

        await eventually(is_ready, timeout=30)
        return proc
    finally:
        await nc.close()


async def test_dead_letters_are_listed_replayed_and_then_succeed(
    router: Settings, infra: Any, unique: str, client_env: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    queue_name, app_name, module_name = f"{unique}-jobs", f"qr-{unique}", f"queue_router_app_{unique}"
    app_dir, marks, logs = tmp_path / "app", tmp_path / "marks", tmp_path / "logs"
    for p in (app_dir, marks, logs):
        p.mkdir()
    (app_dir / f"{module_name}.py").write_text(textwrap.dedent(APP_SOURCE.format(app=app_name, queue=queue_name)))
    monkeypatch.setenv("QUEUE_TEST_MARKS", str(marks))
    monkeypatch.syspath_prepend(str(app_dir))
    module = importlib.import_module(module_name)
    proc = await _start_worker(infra, client_env, module, app_name, marks, logs)
    try:
        queue: df.Queue = module.jobs
        ids = await asyncio.to_thread(queue.put_many, [{"n": 1}, {"n": 2}])

        async def both_dead() -> bool:
            info = await asyncio.to_thread(queue.info)
            return info.dead == 2 and info.depth == 0 and info.has_consumer

        await eventually(both_dead, timeout=30)
        letters = await asyncio.to_thread(queue.dead_letters)
        assert sorted(d.job_id for d in letters) == sorted(ids)
        assert {d.attempts for d in letters} == {2}
        assert sorted(d.error for d in letters) == ["KeyError: 'not yet: 1'", "KeyError: 'not yet: 2'"]
        assert all("heals" in d.traceback for d in letters)

        runner = CliRunner()
        shown = await asyncio.to_thread(runner.invoke, cli, ["queue", "inspect", queue_name, "--json"])
        assert shown.exit_code == 0, shown.output
        assert json.loads(shown.output) == {
            "queue": queue_name,
            "env": client_env,
            "depth": 0,
            "waiting": 0,
            "in_flight": 0,
            "dead": 2,
            "has_worker": True,
        }
        dead = await asyncio.to_thread(runner.invoke, cli, ["queue", "dead", queue_name, "--json"])
        assert dead.exit_code == 0, dead.output
        assert sorted(d["job_id"] for d in json.loads(dead.output)["dead_letters"]) == sorted(ids)

        (marks / "healed").write_text("yes")
        replayed = await asyncio.to_thread(runner.invoke, cli, ["queue", "replay", queue_name, "--json"])
        assert replayed.exit_code == 0, replayed.output
        assert sorted(json.loads(replayed.output)["replayed"]) == sorted(ids)

        async def all_done() -> bool:
            return all((marks / f"done-{job_id}").exists() for job_id in ids)

        await eventually(all_done, timeout=30)
        assert {(marks / f"done-{j}").read_text() for j in ids} == {"1", "2"}
        info = await asyncio.to_thread(queue.info)
        assert (info.dead, info.depth) == (0, 0)
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise AssertionError(
                "the worker did not stop at SIGTERM:\n" + "".join(p.read_text() for p in logs.iterdir())
            ) from None


async def test_storage_round_trips_through_presigned_urls(router: Settings, unique: str, client_env: str) -> None:
    bucket = router.s3_bucket
    url = f"s3://{bucket}/out/{unique}/a.json"

    def roundtrip() -> None:
        assert df.storage.exists(url) is False
        assert df.storage.write_json(url, {"text": "你好", "n": 1}) == url
        assert df.storage.read_json(url) == {"text": "你好", "n": 1}
        assert df.storage.exists(url) is True
        assert df.storage.write_bytes(f"out/{unique}/b.bin", b"\x00\x01") == f"s3://{bucket}/out/{unique}/b.bin"
        assert df.storage.read_bytes(f"s3://{bucket}/out/{unique}/b.bin") == b"\x00\x01"
        assert df.storage.list(f"s3://{bucket}/out/{unique}/") == [url, f"s3://{bucket}/out/{unique}/b.bin"]
        with pytest.raises(df.NotFoundError):
            df.storage.read_bytes(f"s3://{bucket}/out/{unique}/missing")
        with pytest.raises(df.InvalidInputError, match="belong to the platform"):
            df.storage.write_bytes(f"s3://{bucket}/bundles/x.zip", b"x")
        with pytest.raises(df.InvalidInputError, match="stack's bucket"):
            df.storage.read_json(f"s3://other-{unique}/a.json")

    await asyncio.to_thread(roundtrip)

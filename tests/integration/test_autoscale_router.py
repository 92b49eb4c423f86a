"""Autoscaling through a real router and a real agent (``python -m duanflow_agent``, replicas running the SDK's
``duanflow._runtime``) on the session's NATS, Postgres and S3: with a 1 s idle window deployed functions go to zero,
a ``.remote()`` call then starts a replica and returns its result (scale from zero), a worker with a backlog grows
past one replica up to ``scale_to``, and every decision is published as a scheduler event."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import importlib
import io
import os
import sys
import textwrap
import time
import zipfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import duanflow as df
import msgspec
import pytest
from duanflow import _client
from duanflow._local import servers
from duanflow_gateway.adapters.nats import NatsInvoker
from duanflow_proto import codec, subjects
from duanflow_proto.errors import NoCapacityError
from duanflow_proto.messages.common import HealthReply, HealthRequest
from duanflow_proto.messages.invocation import CODEC_JSON, Invocation
from duanflow_proto.messages.release import DeployReply, DeployRequest
from duanflow_proto.messages.scheduler import SchedulerDecision
from duanflow_router.app import RouterApp, build_app
from duanflow_router.settings import Settings
from fixtures.waiting import eventually
from test_agent import Agent, start_agent, stop_agent  # type: ignore[import-not-found]
from test_router import call, upload_bundle  # type: ignore[import-not-found]

pytestmark = pytest.mark.timeout(180)

APP_SOURCE = """
import os
import time
from pathlib import Path

import duanflow as df

app = df.App("{app}", env={{"AUTOSCALE_MARKS": "{marks}"}})
jobs = df.Queue("{queue}")


@app.function(timeout=30)
def hello(x):
    return f"hello {{x}} from {{os.getpid()}}"


@app.worker(queue=jobs, scale_to=3, timeout=30)
def slow(job):
    time.sleep(0.4)
    (Path(os.environ["AUTOSCALE_MARKS"]) / f"done-{{job['n']}}").write_text(str(os.getpid()))
"""


@pytest.fixture
async def router(infra: Any, unique: str, nc_service: Any, request: pytest.FixtureRequest) -> AsyncIterator[RouterApp]:
    overrides: dict[str, Any] = getattr(request, "param", {})  # indirect parametrization: other settings
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
        start_timeout_s=60.0,
        capacity_wait_s=0.0,
        tick_s=0.2,
        autoscale_interval_s=0.2,
        idle_window_s=1.0,
    )
    settings = msgspec.structs.replace(settings, **overrides)
    app = build_app(settings)
    task = asyncio.create_task(app.run())

    async def leading() -> bool:
        msg = await nc_service.request(subjects.health("router"), codec.encode(HealthRequest()), timeout=2)
        reply = codec.decode(msg.data, HealthReply)
        return reply.ok and reply.details.get("role") == "leader"

    try:
        await eventually(leading, timeout=30)
        yield app
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await app.service.broker.stop()


@pytest.fixture
def agent(nats_server: tuple[servers.Proc, servers.NatsCredentials], tmp_path: Path, unique: str) -> Iterator[Agent]:
    """A real agent whose replicas run the SDK's runtime (not the fake one of test_agent.py)."""
    started = start_agent(
        nats_server, tmp_path / "agents", f"ag-{unique}", extra={"DUANFLOW_AGENT_RUNTIME_MODULE": "duanflow._runtime"}
    )
    yield started
    stop_agent(started)


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


def bundle_of(path: Path) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as zf:
        zf.write(path, path.name)
    return out.getvalue()


def replicas_of(router: RouterApp, app: str, function: str) -> list[str]:
    return [r.replica_id for r in router.control().replicas.values() if (r.app, r.function) == (app, function)]


@dataclass
class Deployed:
    """An app deployed from a module written under ``tmp_path``, with the router's decisions about it."""

    module: Any
    reply: DeployReply
    decisions: list[SchedulerDecision]


@contextlib.asynccontextmanager
async def deployed_app(
    nc: Any, tmp_path: Path, module_name: str, source: str, env: str, app_name: str
) -> AsyncIterator[Deployed]:
    """Write ``source`` as ``module_name``, import it, upload it and deploy it (retried until the agent has
    reported), recording every scheduler decision about ``app_name`` from before the deploy on."""
    src_dir = tmp_path / "src"
    src_dir.mkdir()
    src = src_dir / f"{module_name}.py"
    src.write_text(textwrap.dedent(source))
    sys.path.insert(0, str(src_dir))
    decisions: list[SchedulerDecision] = []

    async def on_decision(msg: Any) -> None:
        decision = codec.decode(msg.data, SchedulerDecision)
        if decision.app == app_name:
            decisions.append(decision)

    sub = await nc.subscribe(subjects.event("scheduler", "decision"), cb=on_decision)
    try:
        module = importlib.import_module(module_name)
        spec = module.app.build_spec(module=module_name)
        data = bundle_of(src)
        key, digest = await upload_bundle(nc, data)
        assert hashlib.sha256(data).hexdigest() == digest

        async def deployed() -> DeployReply | None:
            request = DeployRequest(spec=spec, env=env, bundle_key=key, bundle_digest=digest)
            try:
                reply: DeployReply = await call(nc, subjects.API_DEPLOY, request, DeployReply, timeout=120)
            except NoCapacityError:  # the agent has not reported yet
                return None
            return reply

        reply = await eventually(deployed, timeout=60, interval=0.5)
        yield Deployed(module, reply, decisions)
    finally:
        await sub.unsubscribe()
        sys.path.remove(str(src_dir))


async def test_functions_scale_to_zero_back_from_zero_and_up_on_backlog(
    router: RouterApp, agent: Agent, client_env: str, nc_service: Any, unique: str, tmp_path: Path, infra: Any
) -> None:
    env, app_name, queue = client_env, f"auto-{unique}", f"q{unique}"
    marks = tmp_path / "marks"
    marks.mkdir()
    source = APP_SOURCE.format(app=app_name, queue=queue, marks=marks)
    async with deployed_app(nc_service, tmp_path, f"autoscale_app_{unique}", source, env, app_name) as app:
        module, reply, decisions = app.module, app.reply, app.decisions
        assert len(reply.replicas) == 2  # deploy still places one replica per function

        # the functions table names the consumer each function's replicas really pull from (a worker: its queue's)
        conn = await asyncpg.connect(infra.postgres_dsn, server_settings={"search_path": router.settings.schema})
        try:
            rows = {r["name"]: r for r in await conn.fetch("SELECT name, subject, consumer FROM functions")}
        finally:
            await conn.close()
        assert rows["slow"]["consumer"] == subjects.queue_consumer(env, queue)
        assert rows["slow"]["subject"] == subjects.queue(env, queue)
        assert rows["hello"]["consumer"] == subjects.consumer_name(env, app_name, "hello")
        assert rows["hello"]["subject"] == subjects.invocation(env, app_name, "hello")

        # keep_warm=0 and a 1 s idle window: both functions go to zero, each stop a scale_down decision
        async def at_zero() -> bool:
            return not replicas_of(router, app_name, "hello") and not replicas_of(router, app_name, "slow")

        await eventually(at_zero, timeout=30, interval=0.1)
        downs = [d for d in decisions if d.outcome == "scale_down"]
        assert {d.function for d in downs} == {"hello", "slow"}
        assert all(d.reason.startswith("idle for") and d.replica_id for d in downs)

        # scale from zero: the call waits in the stream while the router starts a replica for it
        hello = df.Function.from_name(app_name, "hello", env=env)
        started = time.perf_counter()
        result = await hello.remote.aio("zero")
        cold_s = time.perf_counter() - started
        assert result.startswith("hello zero from ")
        assert int(result.rsplit(" ", 1)[1]) != os.getpid()
        ups = [d for d in decisions if d.outcome == "scale_up" and d.function == "hello"]
        assert ups and ups[-1].reason.startswith("scale from zero"), ups
        placed = [d for d in decisions if d.outcome == "placed" and d.function == "hello" and d.replica_id]
        assert len(placed) == 2  # the deploy's replica and the one started from zero
        print(f"scale from zero → first result: {cold_s * 1e3:.0f} ms")

        # a backlog on the worker's queue: more than one replica, never more than scale_to=3
        jobs = module.jobs
        await asyncio.to_thread(jobs.put_many, [{"n": n} for n in range(16)])
        most = 0

        async def grown() -> bool:
            nonlocal most
            most = max(most, len(replicas_of(router, app_name, "slow")))
            return most >= 2

        await eventually(grown, timeout=60, interval=0.05)

        async def drained() -> bool:
            nonlocal most
            most = max(most, len(replicas_of(router, app_name, "slow")))
            return len(list(marks.glob("done-*"))) == 16

        await eventually(drained, timeout=90, interval=0.1)
        assert 2 <= most <= 3
        backlog = [d for d in decisions if d.outcome == "scale_up" and d.function == "slow"]
        assert any(d.reason.startswith(("backlog", "scale from zero")) for d in backlog), backlog
        workers = {p.read_text() for p in marks.glob("done-*")}
        assert len(workers) >= 2  # the jobs really ran on more than one replica

        # and back to zero once idle
        await eventually(at_zero, timeout=30, interval=0.1)


ENDPOINT_SOURCE = """
import os
import time

import duanflow as df

app = df.App("{app}")


@app.endpoint(method="POST", path="/{app}/work", scale_to=2, timeout=30)
def work(ms: int = 0):
    time.sleep(ms / 1000)
    return os.getpid()
"""


@pytest.mark.parametrize("router", [{"idle_window_s": 3.0}], indirect=True)
async def test_an_endpoint_stays_warm_on_direct_calls_scales_on_busy_ones_and_from_zero(
    router: RouterApp, agent: Agent, client_env: str, nc_service: Any, unique: str, tmp_path: Path
) -> None:
    """Through the gateway's own invoker: direct calls to the warm replica keep it from being idled away (the
    consumer never sees them), calls it is too busy for go to the stream and scale the endpoint up, and with no
    replica the call goes to the stream and starts one."""
    env, app_name = client_env, f"ep-{unique}"
    source = ENDPOINT_SOURCE.format(app=app_name)
    invoker = NatsInvoker(nc_service, nc_service.jetstream())
    await invoker.start()
    try:
        async with deployed_app(nc_service, tmp_path, f"endpoint_app_{unique}", source, env, app_name) as app:
            await endpoint_scales(router, nc_service, invoker, env, app_name, unique, app.decisions)
    finally:
        await invoker.stop()


async def endpoint_scales(
    router: RouterApp,
    nc_service: Any,
    invoker: NatsInvoker,
    env: str,
    app_name: str,
    unique: str,
    decisions: list[SchedulerDecision],
) -> None:
    """The body of the test above, once the endpoint is deployed."""
    consumer = subjects.consumer_name(env, app_name, "work")
    calls = iter(range(1_000_000))

    async def work(ms: int) -> int:
        args = msgspec.json.encode({"args": [], "kwargs": {"ms": ms}})
        invocation = Invocation(
            call_id=f"fc-{unique}-{next(calls)}",
            function="work",
            args=args,
            codec=CODEC_JSON,
            deadline_ms=int((time.time() + 60) * 1000),
        )
        result = await invoker.invoke(
            subjects.invocation(env, app_name, "work"),
            invocation,
            60,
            direct=subjects.direct(env, app_name, "work"),
        )
        assert result.ok, result.error
        return int(msgspec.json.decode(result.value))

    async def delivered() -> int:
        info = await nc_service.jetstream().consumer_info(subjects.STREAM_INVOCATIONS, consumer)
        return int(info.delivered.consumer_seq or 0) if info.delivered else 0

    # Twice the idle window of direct calls: the replica stays, and the consumer never saw a call.
    await work(0)
    before, pids = await delivered(), set()
    end = time.monotonic() + 6.0
    while time.monotonic() < end:
        pids.add(await work(0))
        await asyncio.sleep(0.2)
    assert len(pids) == 1 and await delivered() == before
    assert not [d for d in decisions if d.outcome == "scale_down"], decisions

    # More at once than one replica (concurrency 1) takes: the rest go to the stream, a backlog, a second one.
    pids = set(await asyncio.gather(*(work(400) for _ in range(12))))
    ups = [d for d in decisions if d.outcome == "scale_up"]
    assert ups and any(d.reason.startswith("backlog") for d in ups), decisions
    assert await delivered() > before

    # Idle: to zero; a call then finds no replica (no responders), goes to the stream and starts one.
    async def at_zero() -> bool:
        return not replicas_of(router, app_name, "work")

    await eventually(at_zero, timeout=60, interval=0.1)
    assert await work(0) not in pids
    ups = [d for d in decisions if d.outcome == "scale_up"]
    assert ups[-1].reason.startswith("scale from zero"), ups

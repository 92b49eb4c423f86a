"""The router against real NATS, Postgres and S3, with a stand-in agent run in the test process.

The stand-in answers ``StartReplica`` / ``StopReplica`` on its command subjects and announces itself
through the capacity KV bucket, exactly where a real agent's reports end up.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
import signal
import sys
import urllib.request
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import pytest
from duanflow_kit.handlers import decode_reply
from duanflow_proto import codec, subjects
from duanflow_proto.errors import InvalidInputError, NoCapacityError, NoMatchingGpuError, NotFoundError
from duanflow_proto.messages.agent import (
    CapacityReport,
    FleetReply,
    GpuInfo,
    StartReplica,
    StartReplicaReply,
    StopReplica,
)
from duanflow_proto.messages.common import Ack, ErrorReply, HealthReply, HealthRequest
from duanflow_proto.messages.logs import LogLine
from duanflow_proto.messages.release import (
    AppSpec,
    DeployReply,
    DeployRequest,
    EndpointSpec,
    FunctionLookup,
    FunctionRef,
    FunctionSpec,
    ReleaseList,
    ReleaseListRequest,
    RouteEntry,
    UploadUrlReply,
    UploadUrlRequest,
)
from duanflow_proto.messages.scheduler import SchedulerDecision
from duanflow_router.app import build_app
from duanflow_router.settings import Settings
from fixtures.waiting import eventually
from nats.js.api import AckPolicy
from nats.js.errors import KeyNotFoundError

pytestmark = pytest.mark.timeout(90)

RELEASE_ID = re.compile(r"^rel_\d{8}_\d{4}(_\d+)?$")


def settings_for(infra: Any, unique: str) -> Settings:
    return Settings(
        nats_url=infra.nats_url,
        nats_user="service",
        nats_password=infra.nats.service,
        database_url=infra.postgres_dsn,
        s3_endpoint=infra.s3_endpoint,
        s3_access_key=infra.s3.access_key,
        s3_secret_key=infra.s3.secret_key,
        s3_bucket=f"b{unique}",  # a bucket the router must create itself
        schema=f"router_{unique}",
        start_timeout_s=10.0,
        capacity_wait_s=0.0,
        tick_s=0.2,
    )


async def call(nc: Any, subject: str, msg: Any, reply_type: Any, timeout: float = 15) -> Any:
    reply = await nc.request(subject, codec.encode(msg), timeout=timeout)
    return decode_reply(reply.data, reply_type)


async def _healthy(nc: Any) -> bool:
    h: HealthReply = await call(nc, subjects.health("router"), HealthRequest(), HealthReply, timeout=2)
    return h.ok and h.details.get("db") == "ok" and h.details.get("role") == "leader"


@pytest.fixture
async def router(infra: Any, unique: str, nc_service: Any) -> AsyncIterator[Settings]:
    settings = settings_for(infra, unique)
    app = build_app(settings)
    task = asyncio.create_task(app.run())
    try:
        await eventually(lambda: _healthy(nc_service), timeout=30)
        yield settings
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        # the service stops its broker when cancelled; this closes it even if that stop was cut short
        await app.service.broker.stop()


@dataclass
class StandInAgent:
    """Answers agent commands like a real agent and appears in the capacity bucket."""

    nc: Any
    agent_id: str
    gpus: list[GpuInfo]
    starts: list[StartReplica] = field(default_factory=list)
    stops: list[StopReplica] = field(default_factory=list)
    refuse: ErrorReply | None = None
    subs: list[Any] = field(default_factory=list)
    events: list[str] = field(default_factory=list)

    async def __aenter__(self) -> StandInAgent:
        self.subs.append(await self.nc.subscribe(subjects.agent_command(self.agent_id, "start"), cb=self._start))
        self.subs.append(await self.nc.subscribe(subjects.agent_command(self.agent_id, "stop"), cb=self._stop))
        kv = await self.nc.jetstream().key_value(subjects.KV_CAPACITY)
        report = CapacityReport(
            agent_id=self.agent_id,
            host="stand-in",
            gpus=self.gpus,
            simulated=True,
            ts_ms=_now_ms(),
        )
        await kv.put(subjects.token(self.agent_id), codec.encode(report))
        return self

    async def __aexit__(self, *exc: object) -> None:
        for sub in self.subs:
            await sub.unsubscribe()
        kv = await self.nc.jetstream().key_value(subjects.KV_CAPACITY)
        await kv.delete(subjects.token(self.agent_id))

    async def _start(self, msg: Any) -> None:
        cmd = codec.decode(msg.data, StartReplica)
        self.starts.append(cmd)
        self.events.append(f"start {cmd.replica_id}")
        if self.refuse is not None:
            await msg.respond(codec.encode(self.refuse))
            return
        reply = StartReplicaReply(replica_id=cmd.replica_id, agent_id=self.agent_id, pid=4242, ready_ms=12)
        await msg.respond(codec.encode(reply))

    async def _stop(self, msg: Any) -> None:
        cmd = codec.decode(msg.data, StopReplica)
        self.stops.append(cmd)
        self.events.append(f"stop {cmd.replica_id}")
        await msg.respond(codec.encode(Ack()))


def _now_ms() -> int:
    import time

    return time.time_ns() // 1_000_000


def h100(index: int) -> GpuInfo:
    return GpuInfo(index=index, uuid=f"sim-h100-{index}", gpu_type="H100", memory_total_mb=81559, simulated=True)


async def upload_bundle(nc: Any, data: bytes) -> tuple[str, str]:
    """Upload ``data`` as a bundle the way the CLI does; (key, digest)."""
    digest = hashlib.sha256(data).hexdigest()
    up: UploadUrlReply = await call(
        nc, subjects.API_BUNDLE_UPLOAD, UploadUrlRequest(digest=digest, size=len(data)), UploadUrlReply
    )
    assert up.key.endswith(f"{digest}.zip")
    if not up.exists:
        await asyncio.to_thread(_put, up.url, data)
    return up.key, digest


def _put(url: str, data: bytes) -> None:
    req = urllib.request.Request(url, data=data, method="PUT")
    with urllib.request.urlopen(req, timeout=10) as resp:
        assert resp.status in (200, 204)


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as resp:
        data: bytes = resp.read()
        return data


def app_spec(name: str, **fn_options: Any) -> AppSpec:
    options: dict[str, Any] = {"timeout_s": 60, "retries": 2, "concurrency": 3, "env": {"FN": "1"}, **fn_options}
    fn = FunctionSpec(name="hello", gpu=["H100"], **options)
    return AppSpec(name=name, module="hello_app", functions=[fn], env={"APP": "2"})


# --------------------------------------------------------------------------- health and garbage


async def test_health(router: Settings, nc_service: Any) -> None:
    h: HealthReply = await call(nc_service, subjects.health("router"), HealthRequest(verbose=True), HealthReply)
    assert h.service == "router" and h.ok and h.pid > 0 and h.details["db"] == "ok"


REQUEST_SUBJECTS = [
    subjects.API_BUNDLE_UPLOAD,
    subjects.API_DEPLOY,
    subjects.API_RELEASES,
    subjects.API_FUNCTION_LOOKUP,
    subjects.API_FLEET,
    subjects.health("router"),
]


@pytest.mark.parametrize("subject", REQUEST_SUBJECTS)
@pytest.mark.parametrize(
    "payload", [b"\x00garbage\xff", b"", codec.encode(Ack())], ids=["bytes", "empty", "wrong-type"]
)
async def test_garbage_gets_invalid_input_and_the_router_keeps_serving(
    router: Settings, nc_service: Any, subject: str, payload: bytes
) -> None:
    msg = await nc_service.request(subject, payload, timeout=5)
    err = codec.decode(msg.data, ErrorReply)
    assert err.code == "invalid_input" and err.http_status == 400
    assert await _healthy(nc_service)
    releases: ReleaseList = await call(
        nc_service, subjects.API_RELEASES, ReleaseListRequest(app="nothing"), ReleaseList
    )
    assert releases.releases == []


# --------------------------------------------------------------------------- bundles


async def test_upload_url_put_then_exists(router: Settings, nc_service: Any, unique: str) -> None:
    data = f"bundle of {unique}".encode()
    digest = hashlib.sha256(data).hexdigest()
    first: UploadUrlReply = await call(
        nc_service, subjects.API_BUNDLE_UPLOAD, UploadUrlRequest(digest=digest, size=len(data)), UploadUrlReply
    )
    assert not first.exists and first.url.startswith("http")
    await asyncio.to_thread(_put, first.url, data)
    again: UploadUrlReply = await call(
        nc_service, subjects.API_BUNDLE_UPLOAD, UploadUrlRequest(digest=digest.upper(), size=len(data)), UploadUrlReply
    )
    assert again.exists and again.key == first.key and again.url == ""


@pytest.mark.parametrize(
    ("request_", "code"),
    [
        (UploadUrlRequest(digest="abc", size=1), "invalid_input"),
        (UploadUrlRequest(digest="a" * 64, size=10**10), "payload_too_large"),
    ],
)
async def test_upload_url_refuses_bad_requests(
    router: Settings, nc_service: Any, request_: UploadUrlRequest, code: str
) -> None:
    msg = await nc_service.request(subjects.API_BUNDLE_UPLOAD, codec.encode(request_), timeout=5)
    assert codec.decode(msg.data, ErrorReply).code == code


# --------------------------------------------------------------------------- deploy


async def test_deploy_places_a_replica_on_the_agent(router: Settings, nc_service: Any, infra: Any, unique: str) -> None:
    bundle = b"PK fake zip of " + unique.encode()
    key, digest = await upload_bundle(nc_service, bundle)
    decisions: list[SchedulerDecision] = []
    lines: list[LogLine] = []

    async def on_decision(msg: Any) -> None:
        d = codec.decode(msg.data, SchedulerDecision)
        if d.app == unique:
            decisions.append(d)

    async def on_line(msg: Any) -> None:
        lines.append(codec.decode(msg.data, LogLine))

    subs = [
        await nc_service.subscribe(subjects.event("scheduler", "decision"), cb=on_decision),
        await nc_service.subscribe(subjects.logs("main", unique, "scheduler", "router"), cb=on_line),
    ]
    agent_id = f"ag-{unique}"
    try:
        async with StandInAgent(nc_service, agent_id, [h100(0), h100(1)]) as agent:
            spec = app_spec(unique)
            req = DeployRequest(spec=spec, bundle_key=key, bundle_digest=digest, image_id="im-abc")
            reply: DeployReply = await call(nc_service, subjects.API_DEPLOY, req, DeployReply)

            # the reply
            rel = reply.release
            assert RELEASE_ID.match(rel.release_id) and rel.active and rel.app == unique and rel.env == "main"
            assert len(reply.replicas) == 1 and reply.replicas[0].startswith("rp-")
            assert any(agent_id in m for m in reply.messages)

            # the StartReplica command
            assert len(agent.starts) == 1
            cmd = agent.starts[0]
            consumer = subjects.consumer_name("main", unique, "hello")
            assert (cmd.replica_id, cmd.env, cmd.app, cmd.release, cmd.function, cmd.module) == (
                reply.replicas[0],
                "main",
                unique,
                rel.release_id,
                "hello",
                "hello_app",
            )
            assert (cmd.bundle_digest, cmd.image_id, cmd.stream, cmd.consumer) == (
                digest,
                "im-abc",
                subjects.STREAM_INVOCATIONS,
                consumer,
            )
            assert (cmd.concurrency, cmd.timeout_s, cmd.gpu_indices) == (3, 60, [0])
            assert cmd.env_vars == {"APP": "2", "FN": "1"}
            assert await asyncio.to_thread(_get, cmd.bundle_url) == bundle

            # the durable consumer, as CONTRACTS fixes it
            info = await nc_service.jetstream().consumer_info(subjects.STREAM_INVOCATIONS, consumer)
            cfg = info.config
            assert cfg.durable_name == consumer and AckPolicy(cfg.ack_policy) is AckPolicy.EXPLICIT
            assert cfg.ack_wait == pytest.approx(90) and cfg.max_deliver == 7
            assert cfg.filter_subject == subjects.invocation("main", unique, "hello")

            # the release in Postgres
            conn = await asyncpg.connect(infra.postgres_dsn)
            try:
                rows = await conn.fetch(
                    f'SELECT release_id, active, image_id FROM "{router.schema}".releases WHERE app = $1', unique
                )
                replicas = await conn.fetch(
                    f'SELECT replica_id, agent_id, state FROM "{router.schema}".replicas WHERE app = $1', unique
                )
            finally:
                await conn.close()
            assert [(r["release_id"], r["active"], r["image_id"]) for r in rows] == [(rel.release_id, True, "im-abc")]
            assert [(r["replica_id"], r["agent_id"], r["state"]) for r in replicas] == [
                (reply.replicas[0], agent_id, "running")
            ]

            # the decision, as an event and as a scheduler log line
            await eventually(lambda: _async(bool(decisions) and bool(lines)))
            assert decisions[0].outcome == "placed" and decisions[0].chosen_agent == agent_id
            assert any(c.agent_id == agent_id and c.accepted for c in decisions[0].candidates)
            assert lines[0].kind == "scheduler" and "placed" in lines[0].message

            # lookup and list
            ref: FunctionRef = await call(
                nc_service, subjects.API_FUNCTION_LOOKUP, FunctionLookup(app=unique, function="hello"), FunctionRef
            )
            assert ref.release == rel.release_id and ref.subject == subjects.invocation("main", unique, "hello")
            assert ref.spec.timeout_s == 60
            listed: ReleaseList = await call(
                nc_service, subjects.API_RELEASES, ReleaseListRequest(app=unique), ReleaseList
            )
            assert [r.release_id for r in listed.releases] == [rel.release_id]
            fleet: FleetReply = await call(nc_service, subjects.API_FLEET, HealthRequest(), FleetReply)
            assert agent_id in [a.agent_id for a in fleet.agents]
    finally:
        for sub in subs:
            await sub.unsubscribe()


async def _async(value: bool) -> bool:
    return value


async def test_redeploy_replaces_the_old_replicas(router: Settings, nc_service: Any, unique: str) -> None:
    """On a one-GPU agent the old replica holds the GPU: the router stops it, then starts the new one."""
    key, digest = await upload_bundle(nc_service, b"v1 " + unique.encode())
    async with StandInAgent(nc_service, f"ag-{unique}", [h100(0)]) as agent:
        first: DeployReply = await call(
            nc_service,
            subjects.API_DEPLOY,
            DeployRequest(spec=app_spec(unique), bundle_key=key, bundle_digest=digest),
            DeployReply,
        )
        key2, digest2 = await upload_bundle(nc_service, b"v2 " + unique.encode())
        second: DeployReply = await call(
            nc_service,
            subjects.API_DEPLOY,
            DeployRequest(spec=app_spec(unique, timeout_s=120), bundle_key=key2, bundle_digest=digest2),
            DeployReply,
        )
        assert second.release.release_id != first.release.release_id
        assert [s.replica_id for s in agent.stops] == first.replicas
        assert [s.replica_id for s in agent.starts] == first.replicas + second.replicas
        assert agent.starts[1].bundle_digest == digest2 and agent.starts[1].gpu_indices == [0]
        listed: ReleaseList = await call(nc_service, subjects.API_RELEASES, ReleaseListRequest(app=unique), ReleaseList)
        assert [(r.release_id, r.active) for r in listed.releases] == [
            (second.release.release_id, True),
            (first.release.release_id, False),
        ]
        # the consumer follows the new timeout (same durable name: in-flight calls survive)
        info = await nc_service.jetstream().consumer_info(
            subjects.STREAM_INVOCATIONS, subjects.consumer_name("main", unique, "hello")
        )
        assert info.config.ack_wait == pytest.approx(150)


async def test_redeploy_with_spare_capacity_starts_new_before_stopping_old(
    router: Settings, nc_service: Any, unique: str
) -> None:
    key, digest = await upload_bundle(nc_service, b"bg " + unique.encode())
    req = DeployRequest(spec=app_spec(unique), bundle_key=key, bundle_digest=digest)
    async with StandInAgent(nc_service, f"ag-{unique}", [h100(0), h100(1)]) as agent:
        first: DeployReply = await call(nc_service, subjects.API_DEPLOY, req, DeployReply)
        second: DeployReply = await call(nc_service, subjects.API_DEPLOY, req, DeployReply)
        old, new = first.replicas[0], second.replicas[0]
        assert agent.events == [f"start {old}", f"start {new}", f"stop {old}"]
        assert [s.gpu_indices for s in agent.starts] == [[0], [1]]


async def test_endpoint_routes_follow_the_active_release(router: Settings, nc_service: Any, unique: str) -> None:
    kv = await nc_service.jetstream().key_value(subjects.KV_ROUTES)
    endpoint = FunctionSpec(name="web", kind="endpoint", endpoint=EndpointSpec(method="POST", path="/v1/chat"))
    key, digest = await upload_bundle(nc_service, b"web " + unique.encode())
    async with StandInAgent(nc_service, f"ag-{unique}", [h100(0), h100(1)]):
        spec = AppSpec(name=unique, module="m", functions=[endpoint])
        first: DeployReply = await call(
            nc_service, subjects.API_DEPLOY, DeployRequest(spec=spec, bundle_key=key, bundle_digest=digest), DeployReply
        )
        entry = codec.decode((await kv.get(f"main.{unique}.web")).value, RouteEntry)
        assert (entry.method, entry.path, entry.release) == ("POST", "/v1/chat", first.release.release_id)
        assert entry.subject == subjects.invocation("main", unique, "web")
        # the next release has no endpoint: its route is gone
        spec2 = AppSpec(name=unique, module="m", functions=[FunctionSpec(name="batch")])
        await call(
            nc_service,
            subjects.API_DEPLOY,
            DeployRequest(spec=spec2, bundle_key=key, bundle_digest=digest),
            DeployReply,
        )

        async def gone() -> bool:
            try:
                await kv.get(f"main.{unique}.web")
            except KeyNotFoundError:
                return True
            return False

        await eventually(gone, timeout=5)


async def test_deploy_with_no_agent_is_no_capacity(router: Settings, nc_service: Any, unique: str) -> None:
    kv = await nc_service.jetstream().key_value(subjects.KV_CAPACITY)
    with contextlib.suppress(Exception):
        for k in await kv.keys():
            await kv.delete(k)
    key, digest = await upload_bundle(nc_service, b"lonely " + unique.encode())
    with pytest.raises(NoCapacityError, match="no agent is reporting capacity") as exc:
        await call(
            nc_service,
            subjects.API_DEPLOY,
            DeployRequest(spec=app_spec(unique), bundle_key=key, bundle_digest=digest),
            DeployReply,
        )
    assert exc.value.code == "no_capacity" and exc.value.retryable
    with pytest.raises(NotFoundError):
        await call(nc_service, subjects.API_FUNCTION_LOOKUP, FunctionLookup(app=unique, function="hello"), FunctionRef)


async def test_deploy_names_why_no_agent_fits(router: Settings, nc_service: Any, unique: str) -> None:
    key, digest = await upload_bundle(nc_service, b"picky " + unique.encode())
    async with StandInAgent(nc_service, f"ag-{unique}", [h100(0)]) as agent:
        spec = AppSpec(name=unique, module="m", functions=[FunctionSpec(name="big", gpu=["B200"], gpu_count=2)])
        with pytest.raises(NoMatchingGpuError, match="no GPU of type B200") as exc:
            await call(
                nc_service,
                subjects.API_DEPLOY,
                DeployRequest(spec=spec, bundle_key=key, bundle_digest=digest),
                DeployReply,
            )
        assert agent.agent_id in exc.value.message and agent.starts == []


async def test_agent_refusal_reaches_the_deployer(router: Settings, nc_service: Any, unique: str) -> None:
    key, digest = await upload_bundle(nc_service, b"broken " + unique.encode())
    async with StandInAgent(nc_service, f"ag-{unique}", [h100(0)]) as agent:
        agent.refuse = ErrorReply(
            code="unavailable", message="replica exited with code 1; see its log", http_status=503
        )
        with pytest.raises(Exception, match="replica exited with code 1") as exc:
            await call(
                nc_service,
                subjects.API_DEPLOY,
                DeployRequest(spec=app_spec(unique), bundle_key=key, bundle_digest=digest),
                DeployReply,
            )
        assert getattr(exc.value, "code", "") == "unavailable"
    # nothing became active
    with pytest.raises(NotFoundError):
        await call(nc_service, subjects.API_FUNCTION_LOOKUP, FunctionLookup(app=unique, function="hello"), FunctionRef)


async def test_a_dead_agent_left_in_the_bucket_is_dropped_and_the_replica_placed_elsewhere(
    router: Settings, nc_service: Any, unique: str
) -> None:
    """An agent that died without its leaving report (kill -9, a lost host) keeps its capacity entry until its
    liveness horizon passes. A placement that picks it finds nothing answering: the router drops the agent at once
    and places the replica on another, instead of failing the deploy."""
    key, digest = await upload_bundle(nc_service, b"orphaned " + unique.encode())
    kv = await nc_service.jetstream().key_value(subjects.KV_CAPACITY)

    async def gone(agent_id: str) -> bool:
        try:
            return (await kv.get(subjects.token(agent_id))).value is None
        except Exception:
            return True

    async with (
        StandInAgent(nc_service, f"ag-live{unique}", [h100(0), h100(1)]) as live,
        StandInAgent(nc_service, f"ag-dead{unique}", [h100(0)]) as dead,  # the best fit: one GPU, all free
    ):
        for sub in dead.subs:
            await sub.unsubscribe()
        dead.subs.clear()
        reply: DeployReply = await call(
            nc_service,
            subjects.API_DEPLOY,
            DeployRequest(spec=app_spec(unique), bundle_key=key, bundle_digest=digest),
            DeployReply,
        )
        assert len(reply.replicas) == 1 and [c.replica_id for c in live.starts] == reply.replicas
        assert await gone(dead.agent_id), "the dead agent is out of the capacity bucket"
        assert not await gone(live.agent_id)


async def test_deploy_refuses_a_bundle_that_was_not_uploaded(router: Settings, nc_service: Any, unique: str) -> None:
    digest = hashlib.sha256(unique.encode()).hexdigest()
    with pytest.raises(InvalidInputError, match="not uploaded"):
        await call(
            nc_service,
            subjects.API_DEPLOY,
            DeployRequest(spec=app_spec(unique), bundle_key=f"bundles/{digest}.zip", bundle_digest=digest),
            DeployReply,
        )


# --------------------------------------------------------------------------- lookup


async def test_lookup_of_an_unknown_app_suggests_deploy(router: Settings, nc_service: Any, unique: str) -> None:
    with pytest.raises(NotFoundError) as exc:
        await call(nc_service, subjects.API_FUNCTION_LOOKUP, FunctionLookup(app=unique, function="f"), FunctionRef)
    assert unique in exc.value.message and "duanflow deploy" in exc.value.message


async def test_lookup_of_an_unknown_function_names_it(router: Settings, nc_service: Any, unique: str) -> None:
    key, digest = await upload_bundle(nc_service, b"lookup " + unique.encode())
    async with StandInAgent(nc_service, f"ag-{unique}", [h100(0)]):
        await call(
            nc_service,
            subjects.API_DEPLOY,
            DeployRequest(spec=app_spec(unique), bundle_key=key, bundle_digest=digest),
            DeployReply,
        )
    with pytest.raises(NotFoundError) as exc:
        await call(nc_service, subjects.API_FUNCTION_LOOKUP, FunctionLookup(app=unique, function="nope"), FunctionRef)
    assert "'nope'" in exc.value.message and unique in exc.value.message and "duanflow deploy" in exc.value.message


# --------------------------------------------------------------------------- the process


async def test_sigterm_exits_cleanly(infra: Any, unique: str, nc_service: Any) -> None:
    env = {
        **os.environ,
        "DUANFLOW_NATS_URL": infra.nats_url,
        "DUANFLOW_NATS_USER": "service",
        "DUANFLOW_NATS_PASSWORD": infra.nats.service,
        "DUANFLOW_ROUTER_DATABASE_URL": infra.postgres_dsn,
        "DUANFLOW_ROUTER_S3_ENDPOINT": infra.s3_endpoint,
        "DUANFLOW_ROUTER_S3_ACCESS_KEY": infra.s3.access_key,
        "DUANFLOW_ROUTER_S3_SECRET_KEY": infra.s3.secret_key,
        "DUANFLOW_ROUTER_S3_BUCKET": infra.bucket,
        "DUANFLOW_ROUTER_SCHEMA": f"router_{unique}",
        "DUANFLOW_ROUTER_INSTANCE": f"router-{unique}",
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "duanflow_router",
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:

        async def this_one_answers() -> bool:
            h: HealthReply = await call(nc_service, subjects.health("router"), HealthRequest(), HealthReply, timeout=2)
            return h.instance == f"router-{unique}" and h.ok

        await eventually(this_one_answers, timeout=30)
        proc.send_signal(signal.SIGTERM)
        rc = await asyncio.wait_for(proc.wait(), timeout=10)
        out = (await proc.stdout.read()).decode() if proc.stdout else ""
        assert rc == 0, out
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_a_leaving_agent_is_dropped_and_its_late_reports_ignored(
    router: Settings, nc_service: Any, unique: str
) -> None:
    """An agent that stops sends a ``leaving`` report after its last one; a report of it still in flight (not newer)
    must not store it again as live, or placements would pick a host that is gone."""
    kv = await nc_service.jetstream().key_value(subjects.KV_CAPACITY)
    agent, probe = f"ag-leave{unique}", f"ag-probe{unique}"

    async def report(agent_id: str, ts_ms: int, *, leaving: bool = False) -> None:
        msg = CapacityReport(agent_id=agent_id, host="h", gpus=[h100(0)], simulated=True, ts_ms=ts_ms, leaving=leaving)
        await nc_service.publish(subjects.capacity(agent_id), codec.encode(msg))

    async def stored(agent_id: str) -> bool:
        try:
            return (await kv.get(subjects.token(agent_id))).value is not None
        except Exception:
            return False

    async def gone(agent_id: str) -> bool:
        return not await stored(agent_id)

    now = _now_ms()
    await report(agent, now)
    await eventually(lambda: stored(agent))
    await report(agent, now + 1, leaving=True)
    await eventually(lambda: gone(agent))
    await report(agent, now)  # the late one, sent before it left
    await report(probe, now + 2)  # the router handles reports in order: once this is stored, the late one was seen
    await eventually(lambda: stored(probe))
    assert await gone(agent)
    await report(agent, now + 3)  # restarted under the same id
    await eventually(lambda: stored(agent))
    for a in (agent, probe):
        await report(a, now + 4, leaving=True)
        await eventually(lambda a=a: gone(a))  # type: ignore[misc]

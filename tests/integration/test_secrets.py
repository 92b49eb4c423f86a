"""Secrets and ``duanflow stop`` on the real router (NATS, Postgres, S3), with a stand-in agent in the test process.

The secrets table is read raw to prove values are stored encrypted; the logs stream is read back to prove no
value is ever published; the stand-in agent sees exactly the env vars a replica would get.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import time
import urllib.request
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import msgspec
import pytest
from duanflow_kit.handlers import decode_reply
from duanflow_proto import codec, subjects
from duanflow_proto.errors import InvalidInputError, NotFoundError
from duanflow_proto.messages.agent import (
    CapacityReport,
    FleetReply,
    GpuInfo,
    StartReplica,
    StartReplicaReply,
    StopReplica,
)
from duanflow_proto.messages.build import image_artifact_key
from duanflow_proto.messages.common import Ack, HealthReply, HealthRequest
from duanflow_proto.messages.release import (
    AppSpec,
    AppStopReply,
    AppStopRequest,
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
    bearer_digest,
)
from duanflow_proto.messages.secret import (
    SecretCreateRequest,
    SecretDeleteRequest,
    SecretInfo,
    SecretList,
    SecretListRequest,
)
from duanflow_router.app import build_app
from duanflow_router.settings import Settings
from fixtures.waiting import eventually
from minio import Minio
from nats.js.api import DeliverPolicy

pytestmark = pytest.mark.timeout(90)

SECRET_KEY = "test-secret-key-" + "0123456789abcdef" * 2
TOKEN = "hf_VeryPrivateToken_4242"


def settings_for(infra: Any, unique: str, secret_key: str = SECRET_KEY) -> Settings:
    return Settings(
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
        secret_key=secret_key,
    )


async def call(nc: Any, subject: str, msg: Any, reply_type: Any, timeout: float = 15) -> Any:
    reply = await nc.request(subject, codec.encode(msg), timeout=timeout)
    return decode_reply(reply.data, reply_type)


@contextlib.asynccontextmanager
async def running_router(nc: Any, settings: Settings) -> AsyncIterator[Settings]:
    app = build_app(settings)
    task = asyncio.create_task(app.run())

    async def healthy() -> bool:
        h: HealthReply = await call(nc, subjects.health("router"), HealthRequest(), HealthReply, timeout=2)
        return h.ok and h.details.get("role") == "leader" and h.details.get("db") == "ok"

    try:
        await eventually(healthy, timeout=30)
        yield settings
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await app.service.broker.stop()


@pytest.fixture
async def router(infra: Any, unique: str, nc_service: Any) -> AsyncIterator[Settings]:
    async with running_router(nc_service, settings_for(infra, unique)) as settings:
        yield settings


@dataclass
class StandIn:
    """Answers agent commands like a real agent; keeps what it was asked."""

    nc: Any
    agent_id: str
    starts: list[StartReplica] = field(default_factory=list)
    stops: list[StopReplica] = field(default_factory=list)
    subs: list[Any] = field(default_factory=list)

    async def __aenter__(self) -> StandIn:
        self.subs.append(await self.nc.subscribe(subjects.agent_command(self.agent_id, "start"), cb=self._start))
        self.subs.append(await self.nc.subscribe(subjects.agent_command(self.agent_id, "stop"), cb=self._stop))
        gpus = [
            GpuInfo(index=i, uuid=f"sim-{i}", gpu_type="H100", memory_total_mb=81559, simulated=True) for i in range(4)
        ]
        report = CapacityReport(
            agent_id=self.agent_id, host="h", gpus=gpus, simulated=True, ts_ms=time.time_ns() // 10**6
        )
        kv = await self.nc.jetstream().key_value(subjects.KV_CAPACITY)
        await kv.put(self.agent_id, codec.encode(report))

        async def listed() -> bool:  # the router's fleet view has caught up with the bucket
            fleet: FleetReply = await call(self.nc, subjects.API_FLEET, HealthRequest(), FleetReply, timeout=2)
            return self.agent_id in {a.agent_id for a in fleet.agents}

        await eventually(listed, timeout=10)
        return self

    async def __aexit__(self, *exc: object) -> None:
        for sub in self.subs:
            await sub.unsubscribe()
        kv = await self.nc.jetstream().key_value(subjects.KV_CAPACITY)
        await kv.delete(self.agent_id)

    async def _start(self, msg: Any) -> None:
        cmd = codec.decode(msg.data, StartReplica)
        self.starts.append(cmd)
        reply = StartReplicaReply(replica_id=cmd.replica_id, agent_id=self.agent_id, pid=1, ready_ms=1)
        await msg.respond(codec.encode(reply))

    async def _stop(self, msg: Any) -> None:
        self.stops.append(codec.decode(msg.data, StopReplica))
        await msg.respond(codec.encode(Ack()))


async def upload_bundle(nc: Any, data: bytes) -> tuple[str, str]:
    digest = hashlib.sha256(data).hexdigest()
    up: UploadUrlReply = await call(
        nc, subjects.API_BUNDLE_UPLOAD, UploadUrlRequest(digest=digest, size=len(data)), UploadUrlReply
    )
    if not up.exists:
        req = urllib.request.Request(up.url, data=data, method="PUT")
        await asyncio.to_thread(lambda: urllib.request.urlopen(req, timeout=10).read())
    return up.key, digest


def spec_with(app: str, *, secrets: list[str], fn_secrets: list[str] | None = None, **fn: Any) -> AppSpec:
    f = FunctionSpec(name="hello", gpu=["H100"], secrets=fn_secrets or [], env={"FN": "1"}, **fn)
    return AppSpec(name=app, module="m", functions=[f], secrets=secrets, env={"APP": "plain"})


async def test_secret_stored_encrypted_injected_and_never_logged(
    router: Settings, nc_service: Any, unique: str, infra: Any
) -> None:
    js = nc_service.jetstream()
    seen_logs: list[bytes] = []

    async def keep(msg: Any) -> None:
        seen_logs.append(bytes(msg.data))

    sub = await js.subscribe(subjects.LOGS_ALL, ordered_consumer=True, deliver_policy=DeliverPolicy.NEW, cb=keep)
    info: SecretInfo = await call(
        nc_service,
        subjects.API_SECRET_CREATE,
        SecretCreateRequest(name="hf-prod", env=unique, values={"HF_TOKEN": TOKEN, "HF_USER": "someone-else"}),
        SecretInfo,
    )
    assert info.keys == ["HF_TOKEN", "HF_USER"] and TOKEN not in msgspec.json.encode(info).decode()

    # the table, read raw: names in clear, no value anywhere
    conn = await asyncpg.connect(infra.postgres_dsn)
    try:
        rows = await conn.fetch(f'SELECT * FROM "{router.schema}".secrets')
    finally:
        await conn.close()
    assert len(rows) == 1
    raw = b"".join(v if isinstance(v, bytes) else str(v).encode() for v in rows[0].values())
    assert b"hf-prod" in raw and TOKEN.encode() not in raw and b"someone-else" not in raw

    listed: SecretList = await call(nc_service, subjects.API_SECRET_LIST, SecretListRequest(env=unique), SecretList)
    assert [s.name for s in listed.secrets] == ["hf-prod"] and TOKEN not in repr(listed)

    key, digest = await upload_bundle(nc_service, b"sec " + unique.encode())
    async with StandIn(nc_service, f"ag-{unique}") as agent:
        req = DeployRequest(
            spec=spec_with(unique, secrets=["hf-prod"]), env=unique, bundle_key=key, bundle_digest=digest
        )
        await call(nc_service, subjects.API_DEPLOY, req, DeployReply)
        start = agent.starts[-1]
        assert start.env_vars["HF_TOKEN"] == TOKEN and start.env_vars["APP"] == "plain" and start.env_vars["FN"] == "1"
        assert start.secret_keys == ["HF_TOKEN", "HF_USER"]
        # the release stores the secret's name, never its value
        rels: ReleaseList = await call(
            nc_service, subjects.API_RELEASES, ReleaseListRequest(app=unique, env=unique), ReleaseList
        )
        assert rels.releases[0].spec.secrets == ["hf-prod"] and TOKEN not in repr(rels)

    async def some_logs() -> bool:  # the deploy's scheduler lines arrived
        return any(unique.encode() in m for m in seen_logs)

    await eventually(some_logs, timeout=10)
    await sub.unsubscribe()
    assert not [m for m in seen_logs if TOKEN.encode() in m]


async def test_deploy_naming_a_missing_secret_fails_and_stores_nothing(
    router: Settings, nc_service: Any, unique: str
) -> None:
    key, digest = await upload_bundle(nc_service, b"miss " + unique.encode())
    async with StandIn(nc_service, f"ag-{unique}") as agent:
        spec = spec_with(unique, secrets=[], fn_secrets=["nope-prod"])
        req = DeployRequest(spec=spec, env=unique, bundle_key=key, bundle_digest=digest)
        with pytest.raises(NotFoundError, match="'nope-prod'") as caught:
            await call(nc_service, subjects.API_DEPLOY, req, DeployReply)
        assert "duanflow secret create nope-prod" in caught.value.message
        assert agent.starts == []
    rels: ReleaseList = await call(
        nc_service, subjects.API_RELEASES, ReleaseListRequest(app=unique, env=unique), ReleaseList
    )
    assert rels.releases == []


async def test_bearer_token_from_a_secret(router: Settings, nc_service: Any, unique: str) -> None:
    await call(
        nc_service,
        subjects.API_SECRET_CREATE,
        SecretCreateRequest(name="api-key", env=unique, values={"DUANFLOW_API_KEY_X": "tok-123456"}),
        SecretInfo,
    )
    web = FunctionSpec(
        name="chat", kind="endpoint", endpoint=EndpointSpec(path=f"/{unique}/chat", auth_secret="DUANFLOW_API_KEY_X")
    )
    spec = AppSpec(name=unique, module="m", functions=[web], secrets=["api-key"])
    key, digest = await upload_bundle(nc_service, b"web " + unique.encode())
    async with StandIn(nc_service, f"ag-{unique}"):
        await call(
            nc_service,
            subjects.API_DEPLOY,
            DeployRequest(spec=spec, env=unique, bundle_key=key, bundle_digest=digest),
            DeployReply,
        )
    kv = await nc_service.jetstream().key_value(subjects.KV_ROUTES)
    entry = codec.decode((await kv.get(f"{unique}.{unique}.chat")).value, RouteEntry)
    assert entry.auth_digest == bearer_digest(entry.auth_salt, "tok-123456")
    # a bearer secret key that no secret sets is refused at deploy
    bad = AppSpec(
        name=unique,
        module="m",
        functions=[msgspec.structs.replace(web, endpoint=EndpointSpec(path="/x", auth_secret="MISSING_KEY"))],
        secrets=["api-key"],
    )
    with pytest.raises(InvalidInputError, match="MISSING_KEY"):
        await call(
            nc_service,
            subjects.API_DEPLOY,
            DeployRequest(spec=bad, env=unique, bundle_key=key, bundle_digest=digest),
            DeployReply,
        )


async def test_delete_then_missing(router: Settings, nc_service: Any, unique: str) -> None:
    req = SecretCreateRequest(name="tmp", env=unique, values={"A": "1"})
    await call(nc_service, subjects.API_SECRET_CREATE, req, SecretInfo)
    gone: SecretInfo = await call(
        nc_service, subjects.API_SECRET_DELETE, SecretDeleteRequest(name="tmp", env=unique), SecretInfo
    )
    assert gone.name == "tmp"
    with pytest.raises(NotFoundError):
        await call(nc_service, subjects.API_SECRET_DELETE, SecretDeleteRequest(name="tmp", env=unique), SecretInfo)
    listed: SecretList = await call(nc_service, subjects.API_SECRET_LIST, SecretListRequest(env=unique), SecretList)
    assert listed.secrets == []


async def test_router_without_a_key_refuses_secrets_by_setting_name(infra: Any, unique: str, nc_service: Any) -> None:
    async with running_router(nc_service, settings_for(infra, unique, secret_key="")):
        with pytest.raises(InvalidInputError, match="DUANFLOW_ROUTER_SECRET_KEY"):
            await call(
                nc_service, subjects.API_SECRET_CREATE, SecretCreateRequest(name="x", values={"A": "1"}), SecretInfo
            )


async def test_stop_app_and_image_url(router: Settings, nc_service: Any, unique: str, infra: Any) -> None:
    image = "im-" + hashlib.sha256(unique.encode()).hexdigest()[:24]
    s3 = Minio(infra.s3_endpoint, access_key=infra.s3.access_key, secret_key=infra.s3.secret_key, secure=False)
    await asyncio.to_thread(s3.put_object, router.s3_bucket, image_artifact_key(image), io.BytesIO(b"tgz"), 3)
    key, digest = await upload_bundle(nc_service, b"stop " + unique.encode())
    async with StandIn(nc_service, f"ag-{unique}") as agent:
        req = DeployRequest(
            spec=spec_with(unique, secrets=[]), env=unique, bundle_key=key, bundle_digest=digest, image_id=image
        )
        deployed: DeployReply = await call(nc_service, subjects.API_DEPLOY, req, DeployReply)
        assert agent.starts[-1].image_id == image and image_artifact_key(image) in agent.starts[-1].image_url
        stopped: AppStopReply = await call(
            nc_service, subjects.API_APP_STOP, AppStopRequest(app=unique, env=unique), AppStopReply
        )
        assert stopped.release == deployed.release.release_id and stopped.replicas == deployed.replicas
        assert [s.replica_id for s in agent.stops] == deployed.replicas
    with pytest.raises(NotFoundError, match="not deployed"):
        await call(
            nc_service,
            subjects.API_FUNCTION_LOOKUP,
            FunctionLookup(app=unique, function="hello", env=unique),
            FunctionRef,
        )
    listed: ReleaseList = await call(
        nc_service, subjects.API_RELEASES, ReleaseListRequest(app="", env=unique), ReleaseList
    )
    assert not [r for r in listed.releases if r.app == unique and r.active]
    with pytest.raises(NotFoundError, match="not running"):
        await call(nc_service, subjects.API_APP_STOP, AppStopRequest(app=unique, env=unique), AppStopReply)

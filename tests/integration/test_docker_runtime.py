"""The docker backend and the agent's docker runtime against a real Docker engine (Debian's ``docker.io``).

The test starts ``dockerd`` and ``docker-registry`` in a temp dir (tests/fixtures/docker_engine.py) and makes the
base image itself (no registry outside is reachable). The builder (real NATS, Postgres, S3) renders a spec that
needs docker (``run_commands``) to a Dockerfile, builds it on the engine and pushes it to the registry; the agent
(a real ``python -m duanflow_agent``) pulls it and runs a replica container on the host network that serves a
real ``.remote()`` call through NATS. Through the router: ``duanflow deploy`` of such an app places its replica only on
the agent that reports the docker runtime, which runs it from the registry as a container.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import importlib
import io
import json
import os
import signal
import subprocess
import sys
import textwrap
import zipfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from docker.api.client import APIClient
from duanflow import _client
from duanflow._cli.main import app as cli
from duanflow._local import servers
from duanflow_builder.app import build_app
from duanflow_builder.domain import image_id
from duanflow_builder.settings import Settings
from duanflow_kit.handlers import decode_reply
from duanflow_kit.streams import ensure_streams
from duanflow_proto import codec, subjects
from duanflow_proto.errors import InvalidInputError
from duanflow_proto.messages.agent import CapacityReport, StartReplica, StartReplicaReply, StopReplica
from duanflow_proto.messages.build import BuildRequest, BuildResult, ImageSpec, docker_image_ref
from duanflow_proto.messages.common import Ack, HealthReply, HealthRequest
from duanflow_proto.messages.logs import LogLine
from duanflow_proto.messages.scheduler import SchedulerDecision
from duanflow_router.app import RouterApp
from duanflow_router.app import build_app as build_router
from duanflow_router.settings import Settings as RouterSettings
from fixtures.docker_engine import DockerEngine, docker_engine, missing_binaries
from fixtures.waiting import eventually
from minio import Minio
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from typer.testing import CliRunner

pytestmark = [
    pytest.mark.timeout(180),
    pytest.mark.skipif(
        bool(missing_binaries()),
        reason=f"{', '.join(missing_binaries())} missing: install Debian's docker.io and docker-registry "
        "(scripts/install.sh --docker, run by `make test`)",
    ),
]

APP_SOURCE = """
import os
from pathlib import Path

import duanflow as df

app = df.App("{app}")


@app.function(timeout=20)
def where(tag: str) -> dict[str, str]:
    print(f"serving {{tag}} inside the container", flush=True)
    return {{"tag": tag, "marker": Path("/marker").read_text(), "baked": os.environ.get("BAKED", "")}}
"""

ROUTED_SOURCE = """
import os
from pathlib import Path

import duanflow as df

image = df.Image.debian_slim().run_commands("echo deployed-through-the-router > /marker").env({{"BAKED": "{baked}"}})
app = df.App("{app}", image=image)


@app.function(timeout=20)
def where(tag: str) -> dict[str, str]:
    return {{
        "tag": tag,
        "marker": Path("/marker").read_text(),
        "baked": os.environ.get("BAKED", ""),
        "replica": os.environ.get("DUANFLOW_REPLICA_ID", ""),
    }}
"""


@dataclass
class Stack:
    engine: DockerEngine
    nats_url: str
    creds: servers.NatsCredentials
    root: Path
    token: str
    agent_id: str
    agent: subprocess.Popen[bytes]
    agent_log: Path
    module: ModuleType
    api: APIClient

    @property
    def env(self) -> str:
        return f"e{self.token}"

    @property
    def app(self) -> str:
        return f"dk-{self.token}"


@pytest.fixture(scope="module")
def engine() -> Iterator[DockerEngine]:
    with docker_engine() as eng:
        yield eng


def _start_agent(
    engine: DockerEngine, nats_server: Any, root: Path, agent_id: str, *, docker: bool = True
) -> tuple[subprocess.Popen[bytes], Path]:
    proc_, creds = nats_server
    log_path = root / f"{agent_id}.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("DUANFLOW_")}
    env.update(
        {
            "DUANFLOW_NATS_URL": proc_.address,
            "DUANFLOW_NATS_USER": "agent",
            "DUANFLOW_NATS_PASSWORD": creds.agent,
            "DUANFLOW_AGENT_AGENT_ID": agent_id,
            "DUANFLOW_AGENT_WORK_DIR": str(root / agent_id),
            "DUANFLOW_AGENT_REPORT_INTERVAL_S": "0.2",
            "DUANFLOW_AGENT_START_TIMEOUT_S": "40",
            "DUANFLOW_AGENT_SHUTDOWN_GRACE_S": "3",
            **({"DUANFLOW_AGENT_DOCKER_HOST": engine.host} if docker else {}),
        }
    )
    with log_path.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "duanflow_agent"], env=env, stdout=out, stderr=subprocess.STDOUT)
    return proc, log_path


@pytest.fixture(scope="module")
def stack(
    engine: DockerEngine,
    nats_server: tuple[servers.Proc, servers.NatsCredentials],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Stack]:
    token = os.urandom(4).hex()
    root = tmp_path_factory.mktemp("docker")
    app_dir = root / "app"
    app_dir.mkdir()
    module_name = f"docker_app_{token}"
    (app_dir / f"{module_name}.py").write_text(textwrap.dedent(APP_SOURCE.format(app=f"dk-{token}")))
    agent_id = f"ag-dk-{token}"
    agent, agent_log = _start_agent(engine, nats_server, root, agent_id)
    api = APIClient(base_url=engine.host)
    with pytest.MonkeyPatch.context() as mp:
        # the caller: a user script with the app file importable, connected as the client role
        mp.syspath_prepend(str(app_dir))
        mp.setenv("DUANFLOW_NATS_URL", nats_server[0].address)
        mp.setenv("DUANFLOW_NATS_USER", "client")
        mp.setenv("DUANFLOW_NATS_PASSWORD", nats_server[1].client)
        mp.setenv("DUANFLOW_ENV", f"e{token}")
        mp.setenv("DUANFLOW_HOME", str(root / "home"))
        module = importlib.import_module(module_name)
        _client.reset_client()
        try:
            yield Stack(
                engine=engine,
                nats_url=nats_server[0].address,
                creds=nats_server[1],
                root=root,
                token=token,
                agent_id=agent_id,
                agent=agent,
                agent_log=agent_log,
                module=module,
                api=api,
            )
        finally:
            _client.reset_client()
            if agent.poll() is None:
                agent.send_signal(signal.SIGTERM)
                try:
                    agent.wait(20)
                except subprocess.TimeoutExpired:
                    agent.kill()
                    agent.wait()
            api.close()


@pytest.fixture
async def builder(infra: Any, engine: DockerEngine, nc_service: Any, unique: str) -> AsyncIterator[Settings]:
    settings = Settings(
        nats_url=infra.nats_url,
        nats_user="service",
        nats_password=infra.nats.service,
        database_url=infra.postgres_dsn,
        s3_endpoint=infra.s3_endpoint,
        s3_access_key=infra.s3.access_key,
        s3_secret_key=infra.s3.secret_key,
        s3_bucket=infra.bucket,
        schema=f"builder_{unique}",
        work_dir=str(infra.root / "builds" / unique),
        docker_host=engine.host,
        docker_registry=engine.registry,
        docker_base_image=engine.base_image,
    )
    app = build_app(settings)
    task = asyncio.create_task(app.run())

    async def healthy() -> bool:
        msg = await nc_service.request(subjects.health("builder"), codec.encode(HealthRequest()), timeout=2)
        h: HealthReply = decode_reply(msg.data, HealthReply)
        return h.ok and h.details.get("db") == "ok"

    try:
        await eventually(healthy, timeout=30)
        yield settings
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await app.service.broker.stop()


async def build(nc: Any, req: BuildRequest, timeout: float = 90) -> BuildResult:
    msg = await nc.request(subjects.BUILD_START, codec.encode(req), timeout=timeout)
    result: BuildResult = decode_reply(msg.data, BuildResult)
    return result


def upload_bundle(s3_server: tuple[servers.Proc, servers.S3Credentials], app_dir: Path) -> tuple[str, str]:
    proc, creds = s3_server
    s3 = Minio(proc.address, access_key=creds.access_key, secret_key=creds.secret_key, secure=False, region="us-east-1")
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for f in app_dir.glob("*.py"):
            zf.writestr(f.name, f.read_text())
    data = buf.getvalue()
    digest = hashlib.sha256(data).hexdigest()
    key = f"bundles/{digest}.zip"
    s3.put_object("duanflow", key, io.BytesIO(data), len(data), content_type="application/zip")
    return s3.presigned_get_object("duanflow", key, expires=timedelta(minutes=10)), digest


async def test_build_push_and_serve_a_call_from_a_container(
    stack: Stack,
    builder: Settings,
    nc_service: Any,
    s3_server: tuple[servers.Proc, servers.S3Credentials],
) -> None:
    nc = nc_service
    # the spec needs docker (run_commands): the builder's venv refusal becomes a docker build
    spec = ImageSpec(commands=["echo built-by-docker > /marker"], env={"BAKED": f"baked-{stack.token}"})
    image = image_id(spec)
    lines: list[LogLine] = []

    async def on_line(msg: Any) -> None:
        lines.append(codec.decode(msg.data, LogLine))

    sub = await nc.subscribe(subjects.logs(stack.env, stack.app, "build", image), cb=on_line)
    first = await build(nc, BuildRequest(spec=spec, app=stack.app, env=stack.env))
    assert (first.status, first.backend, first.image_id) == ("built", "docker", image), first
    assert first.artifact == f"{stack.engine.registry}/duanflow/images:{image}"
    await eventually(lambda: _async(any("Successfully tagged" in line.message for line in lines)))
    await eventually(lambda: _async(any("pushing" in line.message for line in lines)))
    await sub.unsubscribe()
    assert all(line.kind == "build" and line.source == image for line in lines)

    # an unchanged spec never builds again, even after the engine forgot the local copy (the registry has it)
    stack.api.remove_image(first.artifact, force=True)
    second = await build(nc, BuildRequest(spec=spec, app=stack.app, env=stack.env))
    assert (second.status, second.artifact) == ("cached", first.artifact)

    # the agent lists the docker runtime, then runs the image as a replica container serving a real call
    async def report() -> CapacityReport:
        s = await nc.subscribe(subjects.capacity(stack.agent_id), max_msgs=1)
        assert stack.agent.poll() is None, stack.agent_log.read_text(errors="replace")[-3000:]
        report: CapacityReport = codec.decode((await s.next_msg(timeout=5)).data, CapacityReport)
        return report

    assert (await eventually(report, timeout=45)).runtimes == ["process", "docker"]
    fn = stack.module.app._registry()["where"]
    js = nc.jetstream()
    await ensure_streams(js)
    await js.add_consumer(
        subjects.STREAM_INVOCATIONS,
        ConsumerConfig(
            durable_name=subjects.consumer_name(stack.env, stack.app, "where"),
            deliver_policy=DeliverPolicy.ALL,
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=fn.spec.timeout_s + 30,
            max_deliver=5,
            filter_subject=subjects.invocation(stack.env, stack.app, "where"),
        ),
    )
    url, digest = upload_bundle(s3_server, Path(stack.module.__file__ or "").parent)
    replica_id = f"rp-dk{stack.token}"
    cmd = StartReplica(
        replica_id=replica_id,
        env=stack.env,
        app=stack.app,
        release="rel_20260101_0000",
        function="where",
        module=stack.module.__name__,
        bundle_url=url,
        bundle_digest=digest,
        image_id=image,
        stream=subjects.STREAM_INVOCATIONS,
        consumer=subjects.consumer_name(stack.env, stack.app, "where"),
        timeout_s=fn.spec.timeout_s,
        docker_image=first.artifact,
    )
    msg = await nc.request(subjects.agent_command(stack.agent_id, "start"), codec.encode(cmd), timeout=60)
    started: StartReplicaReply = decode_reply(msg.data, StartReplicaReply)
    containers = stack.api.containers(filters={"label": f"io.duanflow.replica={replica_id}"})
    assert len(containers) == 1 and containers[0]["Image"] == first.artifact
    assert started.pid > 0 and started.pid != stack.agent.pid

    result = await stack.module.where.remote.aio("hello")
    assert result == {"tag": "hello", "marker": "built-by-docker\n", "baked": f"baked-{stack.token}"}
    log_file = stack.root / stack.agent_id / "logs" / f"{replica_id}.log"
    await eventually(lambda: _async("serving hello inside the container" in log_file.read_text(errors="replace")))

    msg = await nc.request(
        subjects.agent_command(stack.agent_id, "stop"), codec.encode(StopReplica(replica_id=replica_id, grace_s=5)), 30
    )
    ack: Ack = decode_reply(msg.data, Ack)
    assert ack.message.endswith("stopped: exited with code 0"), ack.message  # SIGTERM drained it, no SIGKILL
    assert stack.api.containers(all=True, filters={"label": f"io.duanflow.replica={replica_id}"}) == []


async def test_failed_docker_build_returns_its_log_tail(builder: Settings, nc_service: Any, unique: str) -> None:
    spec = ImageSpec(commands=[f"echo about to fail {unique}", "exit 3"])
    result = await build(nc_service, BuildRequest(spec=spec, app=unique))
    assert (result.status, result.backend, result.artifact) == ("failed", "docker", "")
    assert "returned a non-zero code: 3" in result.log_tail, result.log_tail


async def test_an_image_missing_from_the_registry_is_a_typed_error(
    stack: Stack, nc_service: Any, s3_server: tuple[servers.Proc, servers.S3Credentials]
) -> None:
    url, digest = upload_bundle(s3_server, Path(stack.module.__file__ or "").parent)
    missing = f"{stack.engine.registry}/duanflow/images:im-{'0' * 24}"
    cmd = StartReplica(
        replica_id=f"rp-missing{stack.token}",
        env=stack.env,
        app=stack.app,
        release="rel_20260101_0000",
        function="where",
        module=stack.module.__name__,
        bundle_url=url,
        bundle_digest=digest,
        stream=subjects.STREAM_INVOCATIONS,
        consumer=subjects.consumer_name(stack.env, stack.app, "where"),
        docker_image=missing,
    )
    msg = await nc_service.request(subjects.agent_command(stack.agent_id, "start"), codec.encode(cmd), timeout=30)
    with pytest.raises(InvalidInputError, match="not in the registry"):
        decode_reply(msg.data, StartReplicaReply)
    assert stack.api.containers(all=True, filters={"label": f"io.duanflow.agent={stack.agent_id}"}) == []


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
async def router(infra: Any, engine: DockerEngine, nc_service: Any, unique: str) -> AsyncIterator[RouterApp]:
    """The router in this process, naming the registry the builder pushes docker images to."""
    settings = RouterSettings(
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
        docker_registry=engine.registry,
    )
    app = build_router(settings)
    task = asyncio.create_task(app.run())

    async def leading() -> bool:
        msg = await nc_service.request(subjects.health("router"), codec.encode(HealthRequest()), timeout=2)
        return codec.decode(msg.data, HealthReply).ok and app.leader

    try:
        await eventually(leading, timeout=30)
        yield app
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await app.service.broker.stop()
        # This router stored the module's agents in the capacity bucket, and no router will hear them leave: left
        # there, the next module's router would take them for live for a few seconds and place replicas on them.
        kv = await nc_service.jetstream().key_value(subjects.KV_CAPACITY)
        for key in await _keys(kv):
            if key.startswith(("ag-dk-", "ag-aa-")):
                with contextlib.suppress(Exception):
                    await kv.delete(key)


async def _keys(kv: Any) -> list[str]:
    try:
        keys: list[str] = await kv.keys()
    except Exception:  # an empty bucket
        return []
    return keys


async def test_deploy_through_the_router_runs_the_replica_as_a_container_on_the_docker_agent(
    stack: Stack,
    builder: Settings,
    router: RouterApp,
    engine: DockerEngine,
    nats_server: Any,
    nc_service: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A second agent, process runtime only, whose id sorts first: without the runtime rule it would win the tie.
    plain_id = f"ag-aa-{stack.token}"
    plain, plain_log = _start_agent(engine, nats_server, stack.root, plain_id, docker=False)
    app_name, module_name = f"dkr-{stack.token}", f"routed_app_{stack.token}"
    app_dir = stack.root / "routed"
    app_dir.mkdir()
    app_file = app_dir / f"{module_name}.py"
    app_file.write_text(textwrap.dedent(ROUTED_SOURCE.format(app=app_name, baked=f"routed-{stack.token}")))
    decisions: list[SchedulerDecision] = []

    async def on_decision(msg: Any) -> None:
        decisions.append(codec.decode(msg.data, SchedulerDecision))

    sub = await nc_service.subscribe(subjects.event("scheduler", "decision"), cb=on_decision)
    runner = CliRunner()
    try:

        async def both_live() -> bool:
            assert plain.poll() is None, plain_log.read_text(errors="replace")[-3000:]
            live = {a.agent_id: a.runtimes for a in await router.control().live_agents()}
            return live.get(plain_id) == ["process"] and live.get(stack.agent_id) == ["process", "docker"]

        await eventually(both_live, timeout=45)
        # `duanflow deploy` as a user runs it: bundle upload, docker build, DeployRequest to the router
        got = await asyncio.to_thread(runner.invoke, cli, ["deploy", str(app_file), "--json"])
        assert got.exit_code == 0, got.output + stack.agent_log.read_text(errors="replace")[-3000:]
        deployed = json.loads(got.stdout)
        assert deployed["image_status"] == "built" and len(deployed["replicas"]) == 1, deployed
        replica_id = deployed["replicas"][0]
        assert any(f"replica {replica_id} ready on {stack.agent_id}" in m for m in deployed["messages"]), deployed

        ref = docker_image_ref(engine.registry, deployed["image_id"])
        containers = stack.api.containers(filters={"label": f"io.duanflow.replica={replica_id}"})
        assert len(containers) == 1 and containers[0]["Image"] == ref, containers
        assert containers[0]["Labels"]["io.duanflow.agent"] == stack.agent_id

        monkeypatch.syspath_prepend(str(app_dir))
        module = importlib.import_module(module_name)
        result = await asyncio.to_thread(module.where.remote, "routed")
        assert result == {
            "tag": "routed",
            "marker": "deployed-through-the-router\n",
            "baked": f"routed-{stack.token}",
            "replica": replica_id,
        }
        placed = [d for d in decisions if d.app == app_name and d.outcome == "placed"]
        assert [d.chosen_agent for d in placed] == [stack.agent_id], decisions
        verdicts = {v.agent_id: v for v in placed[0].candidates}
        assert not verdicts[plain_id].accepted and "no docker runtime" in verdicts[plain_id].reason, verdicts

        stopped = await asyncio.to_thread(runner.invoke, cli, ["stop", app_name, "--json"])
        assert stopped.exit_code == 0 and json.loads(stopped.stdout)["replicas"] == [replica_id], stopped.output
        gone = {"all": True, "filters": {"label": f"io.duanflow.replica={replica_id}"}}
        await eventually(lambda: _async(stack.api.containers(**gone) == []), timeout=30)
    finally:
        await sub.unsubscribe()
        await asyncio.to_thread(_stop, plain)


async def _async(value: bool) -> bool:
    return value

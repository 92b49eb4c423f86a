"""The host agent as a real process (``python -m duanflow_agent``) against real NATS and S3.

Replicas run ``fixtures.fake_runtime`` (the agent's ``runtime_module`` setting) in place of ``duanflow._runtime``:
it keeps the agent → replica contract (env, readiness Ack, SIGTERM) without the SDK's worker runtime.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import zipfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import msgspec
import nats
import psutil
import pytest
from duanflow._local import servers
from duanflow_agent import catalog
from duanflow_kit.handlers import decode_reply
from duanflow_kit.streams import ensure_streams
from duanflow_proto import codec, subjects
from duanflow_proto.errors import ConflictError, InvalidInputError, NotFoundError, RemoteError
from duanflow_proto.messages.agent import CapacityReport, StartReplica, StartReplicaReply, StopReplica
from duanflow_proto.messages.common import Ack, ErrorReply, HealthReply, HealthRequest
from duanflow_proto.messages.logs import LogLine
from fixtures.waiting import eventually
from minio import Minio
from nats.js.errors import KeyValueError

pytestmark = pytest.mark.timeout(90)

TESTS_DIR = Path(__file__).resolve().parents[1]
RUNTIME_MODULE = "fixtures.fake_runtime"
BUCKET = "duanflow"


# --------------------------------------------------------------------------- the agent process


@dataclass
class Agent:
    agent_id: str
    proc: subprocess.Popen[bytes]
    work_dir: Path
    log_path: Path

    def output(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def start_agent(
    nats_server: tuple[servers.Proc, servers.NatsCredentials],
    root: Path,
    agent_id: str,
    *,
    role: str = "agent",
    extra: dict[str, str] | None = None,
) -> Agent:
    proc_, creds = nats_server
    work_dir = root / agent_id
    work_dir.mkdir(parents=True)
    log_path = root / f"{agent_id}.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("DUANFLOW_")}
    env.update(
        {
            "DUANFLOW_NATS_URL": proc_.address,
            "DUANFLOW_NATS_USER": role,
            "DUANFLOW_NATS_PASSWORD": creds.as_dict()[role],
            "DUANFLOW_AGENT_AGENT_ID": agent_id,
            "DUANFLOW_AGENT_SIMULATE": "true",
            "DUANFLOW_AGENT_WORK_DIR": str(work_dir),
            "DUANFLOW_AGENT_REGION": "test-east",
            "DUANFLOW_AGENT_LABELS": '{"rack": "r1"}',
            "DUANFLOW_AGENT_PRICES": '{"H100": 2.5, "L4": 0.4}',
            "DUANFLOW_AGENT_REPORT_INTERVAL_S": "0.2",
            "DUANFLOW_AGENT_RUNTIME_MODULE": RUNTIME_MODULE,
            "DUANFLOW_AGENT_START_TIMEOUT_S": "20",
            "DUANFLOW_AGENT_SHUTDOWN_GRACE_S": "3",
            "PYTHONPATH": str(TESTS_DIR),
            **(extra or {}),
        }
    )
    with log_path.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "duanflow_agent"], env=env, stdout=out, stderr=subprocess.STDOUT)
    return Agent(agent_id=agent_id, proc=proc, work_dir=work_dir, log_path=log_path)


def stop_agent(agent: Agent) -> None:
    if agent.proc.poll() is None:
        agent.proc.send_signal(signal.SIGTERM)
        try:
            agent.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            agent.proc.kill()
            agent.proc.wait()


@pytest.fixture(scope="module")
def agent_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("agents")


@pytest.fixture(scope="module")
def shared_agent(nats_server: tuple[servers.Proc, servers.NatsCredentials], agent_root: Path) -> Iterator[Agent]:
    """One agent (NATS role ``agent``, like production) for the tests that do not stop it."""
    agent = start_agent(nats_server, agent_root, f"ag-{os.urandom(4).hex()}")
    yield agent
    stop_agent(agent)


@pytest.fixture
async def nc(nats_server: tuple[servers.Proc, servers.NatsCredentials]) -> AsyncIterator[Any]:
    """A service-role connection: what the router uses to command agents."""
    conn = await nats.connect(nats_server[0].address, user="service", password=nats_server[1].service)
    yield conn
    await conn.close()


@pytest.fixture
async def agent(shared_agent: Agent, nc: Any) -> Agent:
    await wait_healthy(nc, shared_agent)
    return shared_agent


async def health(nc: Any) -> HealthReply:
    msg = await nc.request(subjects.health("agent"), codec.encode(HealthRequest()), timeout=2)
    reply: HealthReply = decode_reply(msg.data, HealthReply)
    return reply


async def wait_healthy(nc: Any, agent: Agent) -> HealthReply:
    async def check() -> HealthReply | None:
        assert agent.proc.poll() is None, f"agent exited with {agent.proc.returncode}:\n{agent.output()[-3000:]}"
        h = await health(nc)
        return h if h.ok and h.details.get("agent_id") == agent.agent_id else None

    return await eventually(check, timeout=45, interval=0.2)


# --------------------------------------------------------------------------- bundles in S3


@pytest.fixture(scope="module")
def s3(s3_server: tuple[servers.Proc, servers.S3Credentials]) -> Minio:
    proc, creds = s3_server
    return Minio(
        proc.address, access_key=creds.access_key, secret_key=creds.secret_key, secure=False, region="us-east-1"
    )


def make_zip(files: dict[str, str]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, text in files.items():
            zf.writestr(name, text)
    return buf.getvalue()


def upload(s3: Minio, data: bytes) -> tuple[str, str]:
    """Put a bundle in S3; its presigned GET URL and sha256."""
    digest = hashlib.sha256(data).hexdigest()
    key = f"bundles/{digest}.zip"
    s3.put_object(BUCKET, key, io.BytesIO(data), len(data), content_type="application/zip")
    return s3.presigned_get_object(BUCKET, key, expires=timedelta(minutes=10)), digest


def start_cmd(
    s3: Minio, unique: str, module_source: str, *, replica: str | None = None, gpus: list[int] | None = None
) -> StartReplica:
    url, digest = upload(s3, make_zip({f"{unique}_mod.py": f"# {unique}\n{module_source}\n", "helper.txt": "x"}))
    return StartReplica(
        replica_id=replica or f"rp-{unique}",
        env="main",
        app=unique,
        release="rel_20260505_1842",
        function="predict",
        module=f"{unique}_mod",
        bundle_url=url,
        bundle_digest=digest,
        stream=subjects.STREAM_INVOCATIONS,
        consumer=subjects.consumer_name("main", unique, "predict"),
        concurrency=4,
        timeout_s=12.5,
        gpu_indices=gpus or [],
        env_vars={"USER_VAR": f"value-{unique}"},
    )


async def command(nc: Any, agent: Agent, verb: str, body: bytes | msgspec.Struct, timeout: float = 30) -> Any:
    data = body if isinstance(body, bytes) else codec.encode(body)
    msg = await nc.request(subjects.agent_command(agent.agent_id, verb), data, timeout=timeout)
    return msg.data


async def start(nc: Any, agent: Agent, cmd: StartReplica) -> StartReplicaReply:
    reply: StartReplicaReply = decode_reply(await command(nc, agent, "start", cmd), StartReplicaReply)
    return reply


async def stop(nc: Any, agent: Agent, replica_id: str, grace_s: float = 5.0) -> Ack:
    reply: Ack = decode_reply(
        await command(nc, agent, "stop", StopReplica(replica_id=replica_id, grace_s=grace_s)), Ack
    )
    return reply


@dataclass
class Collected:
    items: list[Any] = field(default_factory=list)


async def collect(nc: Any, subject: str, type_: type[Any]) -> tuple[Collected, Any]:
    got = Collected()

    async def on_msg(msg: Any) -> None:
        got.items.append(codec.decode(msg.data, type_))

    sub = await nc.subscribe(subject, cb=on_msg)
    await nc.flush()
    return got, sub


async def next_report(nc: Any, agent: Agent) -> CapacityReport:
    msg = await nc.subscribe(subjects.capacity(agent.agent_id), max_msgs=1)
    raw = await msg.next_msg(timeout=5)
    report: CapacityReport = codec.decode(raw.data, CapacityReport)
    return report


def gone(pid: int) -> bool:
    try:
        return bool(psutil.Process(pid).status() == psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return True


# --------------------------------------------------------------------------- health and capacity


async def test_health_reports_the_simulated_inventory(agent: Agent, nc: Any) -> None:
    h = await health(nc)
    assert h.service == "agent" and h.ok and h.pid == agent.proc.pid
    assert h.details["simulated"] == "true"
    assert h.details["gpus"] == str(len(catalog.CATALOG))
    assert set(h.details["gpu_types"].split(",")) == set(catalog.types())


async def test_simulated_capacity_report_lists_every_catalog_type(agent: Agent, nc: Any) -> None:
    report = await next_report(nc, agent)
    assert report.agent_id == agent.agent_id and report.simulated is True
    assert report.region == "test-east" and report.labels == {"rack": "r1"}
    assert report.prices == {"H100": 2.5, "L4": 0.4}
    assert [g.gpu_type for g in report.gpus] == catalog.types()
    assert all(g.simulated for g in report.gpus)
    assert [g.index for g in report.gpus] == list(range(len(catalog.CATALOG)))
    h100 = next(g for g in report.gpus if g.gpu_type == "H100")
    assert h100.memory_total_mb == 80 * 1024
    assert report.cpu_count >= 1 and report.memory_mb > 0 and report.ts_ms > 0
    assert report.interval_s == pytest.approx(0.2)


async def test_garbage_on_every_request_subject_is_refused_and_the_agent_keeps_serving(agent: Agent, nc: Any) -> None:
    for subject in (
        subjects.agent_command(agent.agent_id, "start"),
        subjects.agent_command(agent.agent_id, "stop"),
        subjects.health("agent"),
    ):
        for garbage in (b"", b"\x00\xffnot msgpack", codec.encode(Ack(message="wrong type"))):
            msg = await nc.request(subject, garbage, timeout=5)
            err = codec.decode(msg.data, ErrorReply)
            assert err.code == "invalid_input", (subject, garbage, err)
    assert (await health(nc)).ok
    with pytest.raises(NotFoundError):
        await stop(nc, agent, "rp-nobody-here")
    assert agent.proc.poll() is None


# --------------------------------------------------------------------------- replicas


async def test_start_runs_the_runtime_with_the_contract_env_and_stop_ends_it(
    agent: Agent, nc: Any, s3: Minio, unique: str
) -> None:
    cmd = start_cmd(s3, unique, 'print("module scope ran")', gpus=[0, 6])
    lines, sub = await collect(nc, subjects.logs("main", unique, "runtime", cmd.replica_id), LogLine)
    try:
        reply = await start(nc, agent, cmd)
        assert reply.replica_id == cmd.replica_id and reply.agent_id == agent.agent_id and reply.pid > 0
        proc = psutil.Process(reply.pid)
        assert proc.is_running()
        assert proc.cmdline()[-2:] == ["-m", RUNTIME_MODULE]

        async def env_seen() -> dict[str, Any] | None:
            found = [ln for ln in lines.items if ln.stream == "stdout" and ln.message.startswith("env ")]
            return json.loads(found[0].message[4:]) if found else None

        env = await eventually(env_seen)
        bundle_dir = agent.work_dir / "bundles" / cmd.bundle_digest
        assert env["cwd"] == str(bundle_dir) and (bundle_dir / f"{unique}_mod.py").is_file()
        assert env["PYTHONPATH"].split(":")[0] == str(bundle_dir)
        assert env["DUANFLOW_NATS_USER"] == "agent" and env["has_password"] == "yes"
        assert env["DUANFLOW_REPLICA_ID"] == cmd.replica_id
        assert (env["DUANFLOW_ENV"], env["DUANFLOW_APP"], env["DUANFLOW_RELEASE"]) == ("main", unique, cmd.release)
        assert (env["DUANFLOW_FUNCTION"], env["DUANFLOW_MODULE"]) == ("predict", f"{unique}_mod")
        assert (env["DUANFLOW_STREAM"], env["DUANFLOW_CONSUMER"]) == (cmd.stream, cmd.consumer)
        assert (env["DUANFLOW_CONCURRENCY"], float(env["DUANFLOW_TIMEOUT_S"])) == ("4", 12.5)
        # simulated GPUs: flagged, and no device is exposed
        assert (env["DUANFLOW_SIMULATED_GPU"], env["CUDA_VISIBLE_DEVICES"]) == ("1", "")
        assert env["USER_VAR"] == f"value-{unique}"

        async def module_output_relayed() -> bool:
            msgs = [(ln.stream, ln.message) for ln in lines.items]
            return ("stdout", "module scope ran") in msgs and any(s == "stderr" for s, _ in msgs)

        await eventually(module_output_relayed)
        first = lines.items[0]
        assert (first.kind, first.source, first.replica, first.function) == (
            "runtime",
            cmd.replica_id,
            cmd.replica_id,
            "predict",
        )
        log_file = agent.work_dir / "logs" / f"{cmd.replica_id}.log"
        assert "module scope ran" in log_file.read_text()

        async def reported() -> bool:
            report = await next_report(nc, agent)
            mine = [r for r in report.replicas if r.replica_id == cmd.replica_id]
            return (
                bool(mine) and mine[0].state == "ready" and mine[0].gpu_indices == [0, 6] and mine[0].pid == reply.pid
            )

        await eventually(reported)
        assert (await health(nc)).details["free_gpus"] == str(len(catalog.CATALOG) - 2)

        # the same GPU cannot go to a second replica while this one holds it
        with pytest.raises(ConflictError, match="held by"):
            await start(nc, agent, start_cmd(s3, unique, "", replica=f"rp-{unique}-b", gpus=[6]))
        # a repeated start of a ready replica is answered, not duplicated
        assert (await start(nc, agent, cmd)).pid == reply.pid

        ack = await stop(nc, agent, cmd.replica_id)
        assert "exited with code 0" in ack.message
        assert gone(reply.pid)
        assert "stdout draining" in log_file.read_text(), "the replica got SIGTERM and drained"

        async def unreported() -> bool:
            report = await next_report(nc, agent)
            return all(r.replica_id != cmd.replica_id for r in report.replicas)

        await eventually(unreported)
    finally:
        await sub.unsubscribe()


async def test_replica_that_exits_before_ready_answers_an_error_naming_its_log(
    agent: Agent, nc: Any, s3: Minio, unique: str
) -> None:
    cmd = start_cmd(s3, unique, f'raise RuntimeError("boom {unique}")')
    with pytest.raises(RemoteError) as info:
        await start(nc, agent, cmd)
    log_file = agent.work_dir / "logs" / f"{cmd.replica_id}.log"
    assert str(log_file) in info.value.message and info.value.details["log_path"] == str(log_file)
    assert f"RuntimeError: boom {unique}" in info.value.message, info.value.message
    assert "exited with code 1" in info.value.message
    assert f"boom {unique}" in log_file.read_text()
    report = await next_report(nc, agent)
    assert all(r.replica_id != cmd.replica_id for r in report.replicas)
    assert (await health(nc)).details["replicas"] == "0"


async def test_replica_that_dies_after_ready_is_reported(agent: Agent, nc: Any, s3: Minio, unique: str) -> None:
    cmd = start_cmd(s3, unique, "EXIT_AFTER_READY = True", gpus=[1])
    lines, sub = await collect(nc, subjects.logs("main", unique, "runtime", cmd.replica_id), LogLine)
    try:
        reply = await start(nc, agent, cmd)

        async def notice() -> LogLine | None:
            found = [ln for ln in lines.items if ln.stream == "agent" and "unexpectedly" in ln.message]
            return found[0] if found else None

        line = await eventually(notice)
        assert "exited with code 3" in line.message and line.level == "warning"
        assert gone(reply.pid)

        async def unreported() -> bool:
            report = await next_report(nc, agent)
            return all(r.replica_id != cmd.replica_id for r in report.replicas)

        await eventually(unreported)
        # its GPU is free again
        again = start_cmd(s3, unique, "", replica=f"rp-{unique}-2", gpus=[1])
        assert (await start(nc, agent, again)).pid > 0
        await stop(nc, agent, again.replica_id)
    finally:
        await sub.unsubscribe()


async def test_stop_kills_a_replica_that_ignores_sigterm(agent: Agent, nc: Any, s3: Minio, unique: str) -> None:
    reply = await start(nc, agent, start_cmd(s3, unique, "IGNORE_SIGTERM = True"))
    ack = await stop(nc, agent, reply.replica_id, grace_s=0.5)
    assert "killed by signal 9" in ack.message
    assert gone(reply.pid)
    again = await stop(nc, agent, reply.replica_id)
    assert "already" in again.message


async def test_bundle_with_path_traversal_is_refused(agent: Agent, nc: Any, s3: Minio, unique: str) -> None:
    url, digest = upload(s3, make_zip({f"{unique}_mod.py": "", f"../../{unique}_evil.py": "print('pwned')"}))
    cmd = msgspec.structs.replace(start_cmd(s3, unique, ""), bundle_url=url, bundle_digest=digest)
    with pytest.raises(InvalidInputError, match="escapes the bundle"):
        await start(nc, agent, cmd)
    assert not list(agent.work_dir.parent.rglob(f"{unique}_evil.py"))
    assert not (agent.work_dir / "bundles" / digest).exists()


async def test_bundle_whose_digest_differs_is_refused(agent: Agent, nc: Any, s3: Minio, unique: str) -> None:
    cmd = start_cmd(s3, unique, "")
    wrong = hashlib.sha256(unique.encode()).hexdigest()
    with pytest.raises(InvalidInputError, match="digest mismatch"):
        await start(nc, agent, msgspec.structs.replace(cmd, bundle_digest=wrong))


async def test_a_start_that_never_becomes_ready_times_out(
    nats_server: tuple[servers.Proc, servers.NatsCredentials], agent_root: Path, nc: Any, s3: Minio, unique: str
) -> None:
    agent = start_agent(nats_server, agent_root, f"ag-{unique}", extra={"DUANFLOW_AGENT_START_TIMEOUT_S": "1.5"})
    try:
        await wait_healthy(nc, agent)
        cmd = start_cmd(s3, unique, "NEVER_READY = True")
        data = await command(nc, agent, "start", cmd)
        err = codec.decode(data, ErrorReply)
        assert err.code == "timeout" and "not ready within 1.5s" in err.message
        assert err.details["log_path"] == str(agent.work_dir / "logs" / f"{cmd.replica_id}.log")
        assert (await health(nc)).details["replicas"] == "0"
    finally:
        stop_agent(agent)
    assert agent.proc.returncode == 0


# --------------------------------------------------------------------------- KV and shutdown


async def test_sigterm_stops_the_agent_and_every_replica(
    nats_server: tuple[servers.Proc, servers.NatsCredentials], agent_root: Path, nc: Any, s3: Minio, unique: str
) -> None:
    """A service-role agent that also writes the capacity KV; SIGTERM leaves no replica (nor grandchild) behind."""
    js = nc.jetstream()
    await ensure_streams(js)
    agent = start_agent(
        nats_server, agent_root, f"ag-{unique}", role="service", extra={"DUANFLOW_AGENT_CAPACITY_KV": "true"}
    )
    try:
        await wait_healthy(nc, agent)
        kv = await js.key_value(subjects.KV_CAPACITY)

        async def in_kv() -> CapacityReport:
            entry = await kv.get(agent.agent_id)
            report: CapacityReport = codec.decode(entry.value, CapacityReport)
            assert report.simulated and [g.gpu_type for g in report.gpus] == catalog.types()
            return report

        await eventually(in_kv)

        lines, sub = await collect(nc, subjects.logs_filter("main", unique), LogLine)
        a = await start(nc, agent, start_cmd(s3, unique, "SPAWN_CHILD = True", replica=f"rp-{unique}-a"))
        b = await start(nc, agent, start_cmd(s3, unique, "IGNORE_SIGTERM = True", replica=f"rp-{unique}-b"))

        async def child_pid() -> int | None:
            found = [ln.message for ln in lines.items if ln.message.startswith("child-pid ")]
            return int(found[0].split()[1]) if found else None

        grandchild = await eventually(child_pid)
        await sub.unsubscribe()
        pids = [a.pid, b.pid, grandchild]
        assert all(psutil.pid_exists(p) and not gone(p) for p in pids)

        reports, report_sub = await collect(nc, subjects.capacity(agent.agent_id), CapacityReport)
        agent.proc.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(agent.proc.wait, 30)
        assert code == 0, agent.output()[-3000:]
        assert all(gone(p) for p in pids), [(p, not gone(p)) for p in pids]
        await nc.flush()
        await report_sub.unsubscribe()
        # its last word on the capacity subject says it is leaving (routers drop it and ignore older reports)
        assert reports.items and reports.items[-1].leaving and not any(r.leaving for r in reports.items[:-1])
        with pytest.raises(KeyValueError):  # withdrawn from the capacity bucket, not left for the TTL
            await kv.get(agent.agent_id)
    finally:
        stop_agent(agent)
        for p in psutil.process_iter(["cmdline"]):
            if unique in " ".join(p.info["cmdline"] or []):
                p.kill()

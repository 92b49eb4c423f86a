"""Long GPU jobs end to end: the router (in this process) on the session's NATS, Postgres and S3, a real agent
process with 4 simulated H100s running real replicas (``python -m duanflow._runtime`` in its one-shot job mode),
and the public SDK (``train.spawn(...)`` → ``df.Job``) and CLI (``duanflow jobs list|status|cancel --json``)."""

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
import urllib.request
import zipfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import duanflow as df
import pytest
from duanflow import _client
from duanflow._cli.main import app as cli
from duanflow_kit.handlers import decode_reply
from duanflow_proto import codec, subjects
from duanflow_proto.messages.agent import FleetReply
from duanflow_proto.messages.common import HealthReply, HealthRequest
from duanflow_proto.messages.logs import LogLine
from duanflow_proto.messages.release import DeployReply, DeployRequest, UploadUrlReply, UploadUrlRequest
from duanflow_router.app import RouterApp, build_app
from duanflow_router.settings import Settings
from fixtures.waiting import eventually
from nats.js.api import DeliverPolicy
from typer.testing import CliRunner

pytestmark = pytest.mark.timeout(180)

APP_SOURCE = '''
import os
import time
from pathlib import Path

import duanflow as df

app = df.App("{app}")
MARKS = Path(os.environ.get("JOBS_TEST_MARKS", "."))


def _placement():
    return {{
        "gpus": os.environ.get("DUANFLOW_GPU_INDICES", ""),
        "cuda": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "replica": os.environ.get("DUANFLOW_REPLICA_ID", ""),
        "job": os.environ.get("DUANFLOW_JOB_ID", ""),
    }}


@app.job(gpu="H100", gpu_count=2, timeout=60)
def train(tag, rank=16):
    print(f"training {{tag}} rank={{rank}} on GPUs {{os.environ.get('DUANFLOW_GPU_INDICES')}}", flush=True)
    return {{"tag": tag, "rank": rank, **_placement()}}


@app.job(gpu="H100", gpu_count=2, timeout=60)
def hold(tag):
    """Runs until the test drops the file ``release``; records that it ran."""
    (MARKS / ("running-" + tag)).write_text(os.environ.get("DUANFLOW_GPU_INDICES", ""))
    deadline = time.monotonic() + 50
    while not (MARKS / "release").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    return {{"tag": tag, **_placement()}}


@app.job(gpu="H100", gpu_count=2, timeout=1.5)
def overrun(seconds):
    time.sleep(seconds)
    return "finished"


class BadDataset(Exception):
    pass


@app.job(gpu="H100", gpu_count=1, timeout=30)
def broken(uri):
    raise BadDataset(f"cannot read {{uri}}")
'''


# --------------------------------------------------------------------------- the stack


class Router:
    """The router service in this process; :meth:`restart` stops it and starts a fresh one on the same state."""

    def __init__(self, settings: Settings, nc: Any) -> None:
        self.settings = settings
        self.nc = nc
        self.app: RouterApp | None = None
        self.task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self.app = build_app(self.settings)
        self.task = asyncio.create_task(self.app.run())

        async def healthy() -> bool:
            msg = await self.nc.request(subjects.health("router"), codec.encode(HealthRequest()), timeout=2)
            return codec.decode(msg.data, HealthReply).ok and self.app is not None and self.app.leader

        await eventually(healthy, timeout=30)

    async def stop(self) -> None:
        if self.task is not None and self.app is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
            await self.app.service.broker.stop()
        self.task = None

    def control(self) -> Any:
        assert self.app is not None
        return self.app.control()


@dataclass
class Stack:
    router: Router
    env: str
    app: str
    module: ModuleType
    marks: Path
    agent_id: str
    agent_log: Path
    nc: Any

    def agent_output(self) -> str:
        return self.agent_log.read_text(errors="replace") if self.agent_log.exists() else ""


def _put(url: str, data: bytes) -> None:
    req = urllib.request.Request(url, data=data, method="PUT")
    with urllib.request.urlopen(req, timeout=10) as resp:
        assert resp.status in (200, 204)


async def _call(nc: Any, subject: str, msg: Any, reply_type: Any, timeout: float = 30) -> Any:
    reply = await nc.request(subject, codec.encode(msg), timeout=timeout)
    return decode_reply(reply.data, reply_type)


def _bundle(source: str, module: str) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr(f"{module}.py", source)
    return buf.getvalue()


@contextlib.contextmanager
def _agent(infra: Any, root: Path, agent_id: str, marks: Path) -> Iterator[Path]:
    work_dir = root / agent_id
    work_dir.mkdir(parents=True)
    log_path = root / f"{agent_id}.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("DUANFLOW_")}
    env.update(
        {
            "DUANFLOW_NATS_URL": infra.nats_url,
            "DUANFLOW_NATS_USER": "agent",
            "DUANFLOW_NATS_PASSWORD": infra.nats.agent,
            "DUANFLOW_AGENT_AGENT_ID": agent_id,
            "DUANFLOW_AGENT_GPUS": "H100:4",
            "DUANFLOW_AGENT_SIMULATE": "true",
            "DUANFLOW_AGENT_WORK_DIR": str(work_dir),
            "DUANFLOW_AGENT_REGION": "test-east",
            "DUANFLOW_AGENT_REPORT_INTERVAL_S": "0.2",
            "DUANFLOW_AGENT_START_TIMEOUT_S": "30",
            "DUANFLOW_AGENT_SHUTDOWN_GRACE_S": "2",
            "JOBS_TEST_MARKS": str(marks),
        }
    )
    with log_path.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "duanflow_agent"], env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        yield log_path
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
async def stack(
    infra: Any, unique: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, nc_service: Any
) -> AsyncIterator[Stack]:
    env, app_name, module_name = f"e{unique}", f"jobs-{unique}", f"jobs_app_{unique}"
    marks, app_dir = tmp_path / "marks", tmp_path / "app"
    marks.mkdir()
    app_dir.mkdir()
    source = textwrap.dedent(APP_SOURCE.format(app=app_name))
    (app_dir / f"{module_name}.py").write_text(source)
    monkeypatch.syspath_prepend(str(app_dir))
    module = importlib.import_module(module_name)
    for key, value in {
        "DUANFLOW_NATS_URL": infra.nats_url,
        "DUANFLOW_NATS_USER": "client",
        "DUANFLOW_NATS_PASSWORD": infra.nats.client,
        "DUANFLOW_ENV": env,
        "DUANFLOW_HOME": str(tmp_path / "home"),
        "JOBS_TEST_MARKS": str(marks),
    }.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("DUANFLOW_REPLICA_ID", raising=False)
    _client.reset_client()

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
        start_timeout_s=40.0,
        capacity_wait_s=0.0,
        tick_s=0.2,
    )
    router = Router(settings, nc_service)
    agent_id = f"ag-{unique}"

    async def agent_live() -> bool:
        fleet = await _call(nc_service, subjects.API_FLEET, HealthRequest(), FleetReply)
        return any(a.agent_id == agent_id for a in fleet.agents)

    try:
        await router.start()
        with _agent(infra, tmp_path / "agents", agent_id, marks) as agent_log:
            await eventually(agent_live, timeout=30)
            data = _bundle(source, module_name)
            digest = hashlib.sha256(data).hexdigest()
            up = await _call(
                nc_service, subjects.API_BUNDLE_UPLOAD, UploadUrlRequest(digest=digest, size=len(data)), UploadUrlReply
            )
            if not up.exists:
                await asyncio.to_thread(_put, up.url, data)
            spec = module.app.build_spec(module=module_name)
            reply = await _call(
                nc_service,
                subjects.API_DEPLOY,
                DeployRequest(spec=spec, env=env, bundle_key=up.key, bundle_digest=digest),
                DeployReply,
                timeout=60,
            )
            # Deploys place no warm replica for jobs.
            assert reply.replicas == [], reply.messages
            yield Stack(router, env, app_name, module, marks, agent_id, agent_log, nc_service)
    finally:
        _client.reset_client()
        await router.stop()
        # The agent withdrew its capacity report when it stopped, but this router may have stored a report that
        # was still in flight after that: left there, the next test's router would see a live agent with 4 free
        # GPUs for a few seconds, place a job on it, and let a later job take the real agent's GPUs first.
        with contextlib.suppress(Exception):
            await (await nc_service.jetstream().key_value(subjects.KV_CAPACITY)).delete(subjects.token(agent_id))


async def _held_on_agent(stack: Stack) -> dict[str, list[int]]:
    """Replica → GPUs as the agent itself reports them (its latest capacity report)."""
    fleet = await _call(stack.nc, subjects.API_FLEET, HealthRequest(), FleetReply)
    report = next(a for a in fleet.agents if a.agent_id == stack.agent_id)
    return {r.replica_id: list(r.gpu_indices) for r in report.replicas}


async def _freed(stack: Stack, replica_id: str) -> bool:
    """The job's replica holds no GPU any more: not reserved by the router, not reported by the agent."""
    reserved = any(r.replica_id == replica_id for r in stack.router.control().replicas.values())
    return not reserved and replica_id not in await _held_on_agent(stack)


def _state(job: df.Job[Any]) -> str:
    return job.status().state


# --------------------------------------------------------------------------- tests


async def test_spawn_runs_on_dedicated_gpus_and_get_returns_the_result(stack: Stack) -> None:
    train = stack.module.train
    job = await asyncio.to_thread(train.spawn, "tickets", rank=8)
    assert isinstance(job, df.Job) and job.job_id.startswith("jb-") and job.object_id == job.job_id
    result = await asyncio.to_thread(job.get, 60)
    assert result["tag"] == "tickets" and result["rank"] == 8
    assert result["job"] == job.job_id
    assert len(result["gpus"].split(",")) == 2
    assert result["cuda"] == ""  # simulated GPUs: nothing to open (a real agent lists the indices)

    info = await asyncio.to_thread(job.status)
    assert info.state == "succeeded", info
    assert info.started_ms and info.finished_ms >= info.started_ms >= info.created_ms
    assert info.replica_id == result["replica"] and info.agent_id == stack.agent_id
    assert sorted(info.gpu_indices) == sorted(int(i) for i in result["gpus"].split(","))
    assert info.gpu_type == "H100"
    await eventually(lambda: _freed(stack, info.replica_id), timeout=30)

    # Any process: a fresh handle by id gets the same result.
    again = df.Job.from_id(job.job_id)
    assert (await asyncio.to_thread(again.get, 10))["tag"] == "tickets"
    # .remote() on a job runs it and waits.
    assert (await asyncio.to_thread(train.remote, "remote"))["tag"] == "remote"
    with pytest.raises(df.InvalidInputError, match=r"@app\.job"):
        train.map([1, 2])

    # Its output is on the app's runtime logs, tagged with the job's replica (what `duanflow logs APP` reads).
    js = stack.nc.jetstream()
    sub = await js.subscribe(
        subjects.logs_filter(stack.env, stack.app, "runtime"), deliver_policy=DeliverPolicy.ALL, ordered_consumer=True
    )
    lines: list[LogLine] = []

    async def logged() -> bool:
        with contextlib.suppress(Exception):
            while True:
                msg = await sub.next_msg(timeout=0.2)
                lines.append(codec.decode(msg.data, LogLine))
        return any("training tickets rank=8" in ln.message and ln.replica == info.replica_id for ln in lines)

    try:
        await eventually(logged, timeout=30)
    finally:
        await sub.unsubscribe()


async def test_two_jobs_never_share_a_gpu_and_a_third_waits_for_one(stack: Stack) -> None:
    hold = stack.module.hold
    first, second, third = [await asyncio.to_thread(hold.spawn, tag) for tag in ("a", "b", "c")]

    async def two_running() -> bool:
        return all((stack.marks / f"running-{t}").exists() for t in ("a", "b"))

    await eventually(two_running, timeout=60)

    async def both_shown_running() -> bool:
        # each job writes its mark as it begins; its `running` event reaches the router a moment later
        return [await asyncio.to_thread(_state, j) for j in (first, second)] == ["running", "running"]

    await eventually(both_shown_running, timeout=30)
    infos = [await asyncio.to_thread(j.status) for j in (first, second, third)]
    assert [i.state for i in infos[:2]] == ["running", "running"], infos
    # 4 GPUs, 2 per job: the third is queued until one ends, and says why.
    assert infos[2].state == "queued" and not infos[2].replica_id, infos[2]
    a, b = (set(i.gpu_indices) for i in infos[:2])
    assert len(a) == len(b) == 2 and not a & b, infos
    held = await _held_on_agent(stack)
    assert set(held[infos[0].replica_id]) == a and set(held[infos[1].replica_id]) == b
    assert {(stack.marks / f"running-{t}").read_text() for t in ("a", "b")} == {
        ",".join(map(str, sorted(a))),
        ",".join(map(str, sorted(b))),
    }

    (stack.marks / "release").write_text("go")
    results = [await asyncio.to_thread(j.get, 90) for j in (first, second, third)]
    assert [r["tag"] for r in results] == ["a", "b", "c"]
    seen = [set(map(int, r["gpus"].split(","))) for r in results]
    assert not seen[0] & seen[1]
    for job in (first, second, third):
        replica: str = (await asyncio.to_thread(job.status)).replica_id

        async def freed(r: str = replica) -> bool:
            return await _freed(stack, r)

        await eventually(freed, timeout=30)


async def test_timeout_marks_the_job_timed_out_and_frees_its_gpus(stack: Stack) -> None:
    job = await asyncio.to_thread(stack.module.overrun.spawn, 30)

    async def timed_out() -> bool:
        return await asyncio.to_thread(_state, job) == "timed_out"

    await eventually(timed_out, timeout=60)
    info = await asyncio.to_thread(job.status)
    assert "timeout" in info.error and info.finished_ms, info
    with pytest.raises(df.FunctionTimeoutError):
        await asyncio.to_thread(job.get, 10)
    await eventually(lambda: _freed(stack, info.replica_id), timeout=30)


async def test_failed_job_keeps_its_error_and_traceback(stack: Stack) -> None:
    job = await asyncio.to_thread(stack.module.broken.spawn, "s3://nowhere")
    with pytest.raises(Exception, match="cannot read s3://nowhere") as caught:
        await asyncio.to_thread(job.get, 60)
    assert type(caught.value).__name__ == "BadDataset"
    info = await asyncio.to_thread(job.status)
    assert info.state == "failed" and "BadDataset" in info.error and "raise BadDataset" in info.traceback, info


async def test_cli_lists_shows_and_cancels_jobs(stack: Stack) -> None:
    runner = CliRunner()

    def cli_json(*args: str) -> Any:
        got = runner.invoke(cli, list(args))
        assert got.exit_code == 0, got.output
        return json.loads(got.stdout)

    job = await asyncio.to_thread(stack.module.hold.spawn, "cancel-me")

    async def running() -> bool:
        return (stack.marks / "running-cancel-me").exists()

    await eventually(running, timeout=60)
    listed = await asyncio.to_thread(cli_json, "jobs", "list", "--app", stack.app, "--json")
    assert [j["job_id"] for j in listed["jobs"]] == [job.job_id]

    async def shown_running() -> Any:
        # the job wrote its mark as it began; its `running` event reaches the router a moment later
        shown = await asyncio.to_thread(cli_json, "jobs", "status", job.job_id, "--json")
        return shown if shown["state"] == "running" else None

    shown = await eventually(shown_running, timeout=20)
    assert shown["function"] == "hold" and len(shown["gpu_indices"]) == 2
    replica = shown["replica_id"]

    cancelled = await asyncio.to_thread(cli_json, "jobs", "cancel", job.job_id, "--json")
    assert cancelled["state"] == "cancelled"
    await eventually(lambda: _freed(stack, replica), timeout=30)
    assert (await asyncio.to_thread(cli_json, "jobs", "status", job.job_id, "--json"))["state"] == "cancelled"
    with pytest.raises(df.CallCancelledError):
        await asyncio.to_thread(job.get, 10)
    # Cancelling again changes nothing; a bad id is a clear error, not a traceback.
    assert (await asyncio.to_thread(cli_json, "jobs", "cancel", job.job_id, "--json"))["state"] == "cancelled"
    bad = await asyncio.to_thread(runner.invoke, cli, ["jobs", "status", "jb-00000000deadbeef"])
    assert bad.exit_code == 1 and "no job jb-00000000deadbeef" in bad.output
    listed = await asyncio.to_thread(cli_json, "jobs", "list", "--app", stack.app, "--json")
    assert [j["state"] for j in listed["jobs"]] == ["cancelled"]


async def test_jobs_survive_a_router_restart(stack: Stack) -> None:
    """Submitted jobs are rows and stored invocations: a new router finishes what ended while none ran, and runs
    the job that was still queued."""
    hold = stack.module.hold
    first, second, third = [await asyncio.to_thread(hold.spawn, tag) for tag in ("r1", "r2", "r3")]

    async def two_running() -> bool:
        return all((stack.marks / f"running-{t}").exists() for t in ("r1", "r2"))

    await eventually(two_running, timeout=60)
    assert (await asyncio.to_thread(third.status)).state == "queued"

    await stack.router.stop()
    (stack.marks / "release").write_text("go")
    kv = await stack.nc.jetstream().key_value(subjects.KV_RESULTS)

    async def both_kept() -> bool:
        return all([await kv.get(j.job_id) for j in (first, second)])

    await eventually(both_kept, timeout=30)  # they ended with no router to hear their events
    await stack.router.start()
    results = [await asyncio.to_thread(j.get, 90) for j in (first, second, third)]
    assert [r["tag"] for r in results] == ["r1", "r2", "r3"]
    states = [(await asyncio.to_thread(j.status)).state for j in (first, second, third)]
    assert states == ["succeeded"] * 3

"""An agent's own metrics, scraped in Prometheus' text format from a real ``python -m duanflow_agent`` with
``DUANFLOW_AGENT_METRICS_PORT`` set: its replicas by state and its GPUs (declared here, so simulated: 0 %)."""

from __future__ import annotations

import hashlib
import io
import os
import socket
import subprocess
import sys
import urllib.request
import uuid
import zipfile
from collections.abc import AsyncIterator, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import nats
import pytest
from duanflow._local import servers
from duanflow_kit.handlers import decode_reply
from duanflow_proto import codec, subjects
from duanflow_proto.messages.agent import StartReplica, StartReplicaReply, StopReplica
from duanflow_proto.messages.common import Ack, HealthReply, HealthRequest
from fixtures.waiting import eventually
from minio import Minio

pytestmark = pytest.mark.timeout(90)

TESTS_DIR = Path(__file__).resolve().parents[1]


def ma_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def ma_scrape(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        body = resp.read().decode()
    series: dict[str, float] = {}
    for line in body.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            series[key] = float(value)
    return series


@pytest.fixture
def ma_agent(nats_server: tuple[servers.Proc, servers.NatsCredentials], tmp_path: Path) -> Iterator[tuple[str, int]]:
    """An agent declaring two H100s, serving its metrics: (agent id, port)."""
    proc_, creds = nats_server
    agent_id, port = f"ag-ma-{uuid.uuid4().hex[:8]}", ma_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DUANFLOW_", "OTEL_"))}
    env.update(
        DUANFLOW_NATS_URL=proc_.address,
        DUANFLOW_NATS_USER="agent",
        DUANFLOW_NATS_PASSWORD=creds.agent,
        DUANFLOW_AGENT_AGENT_ID=agent_id,
        DUANFLOW_AGENT_GPUS="H100:2",
        DUANFLOW_AGENT_WORK_DIR=str(tmp_path / "work"),
        DUANFLOW_AGENT_RUNTIME_MODULE="fixtures.fake_runtime",
        DUANFLOW_AGENT_START_TIMEOUT_S="20",
        DUANFLOW_AGENT_SHUTDOWN_GRACE_S="3",
        DUANFLOW_AGENT_METRICS_PORT=str(port),
        PYTHONPATH=str(TESTS_DIR),
    )
    log = (tmp_path / "agent.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "duanflow_agent"], env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        yield agent_id, port
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@pytest.fixture
async def ma_nc(nats_server: tuple[servers.Proc, servers.NatsCredentials]) -> AsyncIterator[Any]:
    conn = await nats.connect(nats_server[0].address, user="service", password=nats_server[1].service)
    yield conn
    await conn.close()


def ma_start(s3_server: tuple[servers.Proc, servers.S3Credentials]) -> StartReplica:
    """A start command for a bundle (one empty module) put in S3."""
    proc, creds = s3_server
    s3 = Minio(proc.address, access_key=creds.access_key, secret_key=creds.secret_key, secure=False, region="us-east-1")
    if not s3.bucket_exists("duanflow"):
        s3.make_bucket("duanflow")
    module, app = f"ma_{uuid.uuid4().hex[:8]}", f"ma-{uuid.uuid4().hex[:8]}"
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr(f"{module}.py", f"# {module}\n")
    data = buf.getvalue()
    digest = hashlib.sha256(data).hexdigest()
    key = f"bundles/{digest}.zip"
    s3.put_object("duanflow", key, io.BytesIO(data), len(data), content_type="application/zip")
    return StartReplica(
        replica_id=f"rp-{uuid.uuid4().hex[:10]}",
        env="main",
        app=app,
        release="rel_20260505_1842",
        function="predict",
        module=module,
        bundle_url=s3.presigned_get_object("duanflow", key, expires=timedelta(minutes=10)),
        bundle_digest=digest,
        stream=subjects.STREAM_INVOCATIONS,
        consumer=subjects.consumer_name("main", app, "predict"),
        gpu_indices=[1],
    )


async def test_replicas_and_gpus_of_an_agent_are_scrapeable(
    ma_agent: tuple[str, int], ma_nc: Any, s3_server: tuple[servers.Proc, servers.S3Credentials]
) -> None:
    agent_id, port = ma_agent

    async def healthy() -> bool:
        msg = await ma_nc.request(subjects.health("agent"), codec.encode(HealthRequest()), timeout=2)
        h: HealthReply = decode_reply(msg.data, HealthReply)
        return h.ok and h.details.get("agent_id") == agent_id

    await eventually(healthy, timeout=45, interval=0.2)
    before = ma_scrape(port)
    gpu = [f'{{agent="{agent_id}",gpu="{i}",gpu_type="H100",simulated="true"}}' for i in (0, 1)]
    assert before[f"duanflow_agent_gpu_utilization_percent{gpu[0]}"] == 0  # simulated GPUs: no NVML reading
    assert before[f"duanflow_agent_gpu_memory_used_mib{gpu[1]}"] == 0
    ready = f'duanflow_agent_replicas{{agent="{agent_id}",state="ready"}}'
    assert ready not in before
    cmd = ma_start(s3_server)
    msg = await ma_nc.request(subjects.agent_command(agent_id, "start"), codec.encode(cmd), timeout=30)
    decode_reply(msg.data, StartReplicaReply)
    try:
        assert ma_scrape(port)[ready] == 1
        start = f'service="agent",subject="{subjects.health("agent")}",outcome="ok"'
        assert ma_scrape(port)[f"duanflow_requests_total{{{start}}}"] >= 1  # the kit's request metrics too
    finally:
        data = codec.encode(StopReplica(replica_id=cmd.replica_id, grace_s=3))
        msg = await ma_nc.request(subjects.agent_command(agent_id, "stop"), data, timeout=20)
        decode_reply(msg.data, Ack)
    exited = ma_scrape(port)
    assert exited.get(ready, 0) == 0 and exited[f'duanflow_agent_replicas{{agent="{agent_id}",state="exited"}}'] == 1

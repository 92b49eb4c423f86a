"""The cold start on the agent's side: a real agent (``python -m duanflow_agent``, exporting over OTLP/HTTP to a
receiver in this test) wraps each ``StartReplica`` in a ``cold start <app>.<function>`` span, a child of the trace
context in the command's NATS headers (the router's), or the root of a trace of its own when there is none."""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import sys
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
from fixtures.otlp import Received, ReceivedSpan, otlp_receiver
from fixtures.waiting import eventually
from minio import Minio

pytestmark = pytest.mark.timeout(90)

TESTS_DIR = Path(__file__).resolve().parents[1]


@pytest.fixture
def cs_receiver() -> Iterator[Received]:
    with otlp_receiver() as received:
        yield received


@pytest.fixture
def cs_agent(
    nats_server: tuple[servers.Proc, servers.NatsCredentials], tmp_path: Path, cs_receiver: Received
) -> Iterator[str]:
    """A simulated agent whose replicas run ``fixtures.fake_runtime``; its id."""
    proc_, creds = nats_server
    agent_id = f"ag-cs-{uuid.uuid4().hex[:8]}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DUANFLOW_", "OTEL_"))}
    env.update(
        DUANFLOW_NATS_URL=proc_.address,
        DUANFLOW_NATS_USER="agent",
        DUANFLOW_NATS_PASSWORD=creds.agent,
        DUANFLOW_AGENT_AGENT_ID=agent_id,
        DUANFLOW_AGENT_SIMULATE="true",
        DUANFLOW_AGENT_WORK_DIR=str(tmp_path / "work"),
        DUANFLOW_AGENT_RUNTIME_MODULE="fixtures.fake_runtime",
        DUANFLOW_AGENT_START_TIMEOUT_S="20",
        DUANFLOW_AGENT_SHUTDOWN_GRACE_S="3",
        PYTHONPATH=str(TESTS_DIR),
        OTEL_EXPORTER_OTLP_ENDPOINT=cs_receiver.url,
        OTEL_BSP_SCHEDULE_DELAY="50",
    )
    log = (tmp_path / "agent.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "duanflow_agent"], env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        yield agent_id
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@pytest.fixture
async def cs_nc(nats_server: tuple[servers.Proc, servers.NatsCredentials]) -> AsyncIterator[Any]:
    conn = await nats.connect(nats_server[0].address, user="service", password=nats_server[1].service)
    yield conn
    await conn.close()


def cs_bundle(s3_server: tuple[servers.Proc, servers.S3Credentials], module: str) -> tuple[str, str]:
    """A bundle holding ``module``, in S3: its presigned URL and digest."""
    proc, creds = s3_server
    s3 = Minio(proc.address, access_key=creds.access_key, secret_key=creds.secret_key, secure=False, region="us-east-1")
    if not s3.bucket_exists("duanflow"):
        s3.make_bucket("duanflow")
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr(f"{module}.py", f"# {module}\n")
    data = buf.getvalue()
    digest = hashlib.sha256(data).hexdigest()
    key = f"bundles/{digest}.zip"
    s3.put_object("duanflow", key, io.BytesIO(data), len(data), content_type="application/zip")
    return s3.presigned_get_object("duanflow", key, expires=timedelta(minutes=10)), digest


def cs_start(app: str, url: str, digest: str, module: str) -> StartReplica:
    return StartReplica(
        replica_id=f"rp-{uuid.uuid4().hex[:10]}",
        env="main",
        app=app,
        release="rel_20260505_1842",
        function="predict",
        module=module,
        bundle_url=url,
        bundle_digest=digest,
        stream=subjects.STREAM_INVOCATIONS,
        consumer=subjects.consumer_name("main", app, "predict"),
    )


async def test_the_agents_cold_start_span_joins_the_callers_trace_or_starts_its_own(
    cs_agent: str,
    cs_nc: Any,
    cs_receiver: Received,
    s3_server: tuple[servers.Proc, servers.S3Credentials],
) -> None:
    async def healthy() -> bool:
        msg = await cs_nc.request(subjects.health("agent"), codec.encode(HealthRequest()), timeout=2)
        h: HealthReply = decode_reply(msg.data, HealthReply)
        return h.ok and h.details.get("agent_id") == cs_agent

    await eventually(healthy, timeout=45, interval=0.2)
    app = f"cs-{uuid.uuid4().hex[:8]}"
    module = f"cs_{uuid.uuid4().hex[:8]}"
    url, digest = cs_bundle(s3_server, module)
    subject = subjects.agent_command(cs_agent, "start")
    trace_id, parent_id = os.urandom(16).hex(), os.urandom(8).hex()
    joined, alone = cs_start(app, url, digest, module), cs_start(app, url, digest, module)
    try:
        msg = await cs_nc.request(
            subject, codec.encode(joined), timeout=30, headers={"traceparent": f"00-{trace_id}-{parent_id}-01"}
        )
        reply: StartReplicaReply = decode_reply(msg.data, StartReplicaReply)
        msg = await cs_nc.request(subject, codec.encode(alone), timeout=30)
        decode_reply(msg.data, StartReplicaReply)

        name = f"cold start {app}.predict"

        async def both() -> dict[str, ReceivedSpan] | None:
            got = {str(s.attributes.get("duanflow.replica")): s for s in cs_receiver.named(name)}
            return got if len(got) == 2 else None

        spans = await eventually(both, timeout=20)
        first, second = spans[joined.replica_id], spans[alone.replica_id]
        assert (first.trace_id, first.parent_id) == (trace_id, parent_id)  # the caller's trace
        assert first.attributes["duanflow.ready_ms"] == reply.ready_ms and first.service == "duanflow-agent"
        assert first.end_ns - first.start_ns >= reply.ready_ms * 1_000_000
        assert second.parent_id == "" and second.trace_id not in (trace_id, first.trace_id)  # a trace of its own
    finally:
        for cmd in (joined, alone):
            data = codec.encode(StopReplica(replica_id=cmd.replica_id, grace_s=3))
            msg = await cs_nc.request(subjects.agent_command(cs_agent, "stop"), data, timeout=20)
            decode_reply(msg.data, Ack)

"""The router's metrics in Prometheus' text format, from a real router (NATS, Postgres, S3) in the test process:
queue depth per function consumer and per work-queue consumer, replicas per function and state, and the agents'
GPU utilisation from their capacity reports. The agent is a stand-in that beats on the capacity subject (agent
role) and answers ``StartReplica`` like a real one; nothing consumes the invocations, so they stay pending.
The same router carries a deploy's trace into the ``StartReplica`` it sends (the agent's cold start joins it)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import socket
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from typing import Any

import nats
import pytest
from duanflow_kit.handlers import decode_reply
from duanflow_proto import codec, subjects
from duanflow_proto.messages.agent import CapacityReport, GpuInfo, StartReplica, StartReplicaReply, StopReplica
from duanflow_proto.messages.common import Ack, HealthReply, HealthRequest
from duanflow_proto.messages.release import (
    AppSpec,
    DeployReply,
    DeployRequest,
    FunctionSpec,
    UploadUrlReply,
    UploadUrlRequest,
)
from duanflow_router.app import build_app
from duanflow_router.settings import Settings
from fixtures.waiting import eventually
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.util._once import Once

pytestmark = pytest.mark.timeout(90)


def mr_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def mr_scrape(port: int) -> dict[str, float]:
    """Every series of one scrape: ``name{labels}`` → value."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    await writer.drain()
    raw = await reader.read()
    writer.close()
    head, _, body = raw.decode().partition("\r\n\r\n")
    assert head.startswith("HTTP/1.1 200")
    series: dict[str, float] = {}
    for line in body.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            series[key] = float(value)
    return series


async def mr_call(nc: Any, subject: str, msg: Any, reply_type: Any, timeout: float = 15) -> Any:
    reply = await nc.request(subject, codec.encode(msg), timeout=timeout)
    return decode_reply(reply.data, reply_type)


@pytest.fixture
async def mr_router(infra: Any, unique: str, nc_service: Any) -> AsyncIterator[int]:
    """A leading router serving its metrics; the port."""
    port = mr_port()
    settings = Settings(
        nats_url=infra.nats_url,
        nats_user="service",
        nats_password=infra.nats.service,
        database_url=infra.postgres_dsn,
        s3_endpoint=infra.s3_endpoint,
        s3_access_key=infra.s3.access_key,
        s3_secret_key=infra.s3.secret_key,
        s3_bucket=infra.bucket,
        schema=f"router_{unique}",
        start_timeout_s=10.0,
        capacity_wait_s=0.0,
        tick_s=0.2,
        metrics_port=port,
        queue_metrics_interval_s=0.2,
    )
    app = build_app(settings)
    task = asyncio.create_task(app.run())

    async def leading() -> bool:
        h: HealthReply = await mr_call(nc_service, subjects.health("router"), HealthRequest(), HealthReply, 2)
        return h.ok and h.details.get("role") == "leader"

    try:
        await eventually(leading, timeout=30)
        yield port
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await app.service.broker.stop()


def mr_gpus() -> list[GpuInfo]:
    return [
        GpuInfo(index=0, uuid="gpu-0", gpu_type="H100", memory_total_mb=81559, memory_used_mb=2048, utilization_pct=37),
        GpuInfo(index=1, uuid="gpu-1", gpu_type="H100", memory_total_mb=81559, memory_used_mb=0, utilization_pct=0),
    ]


@contextlib.asynccontextmanager
async def mr_agent(
    infra: Any, nc_service: Any, agent_id: str, starts: list[StartReplica], headers: list[dict[str, str]] | None = None
) -> AsyncIterator[None]:
    """A stand-in agent: capacity reports (KV and beats on the capacity subject), start and stop answered."""
    agent_nc = await nats.connect(infra.nats_url, user="agent", password=infra.nats.agent)

    def report() -> bytes:
        return codec.encode(
            CapacityReport(agent_id=agent_id, host="stand-in", gpus=mr_gpus(), ts_ms=time.time_ns() // 1_000_000)
        )

    async def start(msg: Any) -> None:
        cmd = codec.decode(msg.data, StartReplica)
        starts.append(cmd)
        if headers is not None:
            headers.append(dict(msg.headers or {}))
        reply = StartReplicaReply(replica_id=cmd.replica_id, agent_id=agent_id, pid=4242, ready_ms=5)
        await msg.respond(codec.encode(reply))

    async def stop(msg: Any) -> None:
        codec.decode(msg.data, StopReplica)
        await msg.respond(codec.encode(Ack()))

    async def beat() -> None:
        while True:
            await agent_nc.publish(subjects.capacity(agent_id), report())
            await asyncio.sleep(0.3)

    subs = [
        await nc_service.subscribe(subjects.agent_command(agent_id, "start"), cb=start),
        await nc_service.subscribe(subjects.agent_command(agent_id, "stop"), cb=stop),
    ]
    kv = await nc_service.jetstream().key_value(subjects.KV_CAPACITY)
    await kv.put(subjects.token(agent_id), report())
    beating = asyncio.create_task(beat())
    try:
        yield
    finally:
        beating.cancel()
        for sub in subs:
            await sub.unsubscribe()
        with contextlib.suppress(Exception):
            await kv.delete(subjects.token(agent_id))
        await agent_nc.close()


async def mr_bundle(nc_service: Any, unique: str) -> tuple[str, str]:
    """An uploaded bundle: its key and digest."""
    data = b"PK bundle of " + unique.encode()
    digest = hashlib.sha256(data).hexdigest()
    up: UploadUrlReply = await mr_call(
        nc_service, subjects.API_BUNDLE_UPLOAD, UploadUrlRequest(digest=digest, size=len(data)), UploadUrlReply
    )
    if not up.exists:
        await asyncio.to_thread(_put, up.url, data)
    return up.key, digest


def _put(url: str, data: bytes) -> None:
    with urllib.request.urlopen(urllib.request.Request(url, data=data, method="PUT"), timeout=10) as resp:
        assert resp.status in (200, 204)


async def test_queue_depth_replicas_and_gpu_utilisation_are_scrapeable(
    mr_router: int, infra: Any, nc_service: Any, unique: str
) -> None:
    port, agent_id = mr_router, f"ag-{unique}"
    key, digest = await mr_bundle(nc_service, unique)
    js = nc_service.jetstream()
    queue = f"q{unique}"
    await js.add_consumer(
        subjects.STREAM_QUEUES,
        ConsumerConfig(
            durable_name=subjects.queue_consumer("main", queue),
            deliver_policy=DeliverPolicy.ALL,
            ack_policy=AckPolicy.EXPLICIT,
            filter_subject=subjects.queue("main", queue),
        ),
    )
    starts: list[StartReplica] = []
    try:
        async with mr_agent(infra, nc_service, agent_id, starts):
            fn = FunctionSpec(name="hello", gpu=["H100"], timeout_s=60)
            spec = AppSpec(name=unique, module="hello_app", functions=[fn])
            req = DeployRequest(spec=spec, bundle_key=key, bundle_digest=digest)
            reply: DeployReply = await mr_call(nc_service, subjects.API_DEPLOY, req, DeployReply)
            assert len(reply.replicas) == 1
            for i in range(3):
                await js.publish(subjects.invocation("main", unique, "hello"), b"call %d" % i)
            for i in range(2):
                await js.publish(subjects.queue("main", queue), b"job %d" % i)
            lone = f"l{unique}"  # a queue no worker consumes yet
            await js.publish(subjects.queue("main", lone), b"job")
            fn_consumer = subjects.consumer_name("main", unique, "hello")
            fn_labels = (
                f'stream="{subjects.STREAM_INVOCATIONS}",consumer="{fn_consumer}",'
                f'subject="{subjects.invocation("main", unique, "hello")}",kind="function"'
            )
            q_labels = (
                f'stream="{subjects.STREAM_QUEUES}",consumer="{subjects.queue_consumer("main", queue)}",'
                f'subject="{subjects.queue("main", queue)}",kind="queue"'
            )

            # per queue subject, with or without a consumer (what len(queue) says)
            per_subject = {
                f'duanflow_queue_messages{{subject="{subjects.queue("main", queue)}"}}': 2,
                f'duanflow_queue_messages{{subject="{subjects.queue("main", lone)}"}}': 1,
            }

            async def scraped() -> dict[str, float] | None:
                # A scrape can fall between the router's consumer reads and its per-subject read: wait for both.
                got = await mr_scrape(port)
                ready = got.get(f"duanflow_queue_pending{{{fn_labels}}}") == 3
                ready = ready and got.get(f"duanflow_queue_pending{{{q_labels}}}") == 2
                return got if ready and all(got.get(k) == v for k, v in per_subject.items()) else None

            series = await eventually(scraped, timeout=20)
            assert series[f"duanflow_queue_ack_pending{{{fn_labels}}}"] == 0
            assert series[f"duanflow_queue_delivered_total{{{q_labels}}}"] == 0
            # the replicas the router placed: the deploy's, and any the autoscaler added for the backlog
            running = f'duanflow_replicas{{env="main",app="{unique}",function="hello",state="running"}}'
            assert series[running] == len(starts) >= 1
            gpu = [f'{{agent="{agent_id}",gpu="{i}",gpu_type="H100",simulated="false"}}' for i in (0, 1)]
            assert series[f"duanflow_gpu_utilization_percent{gpu[0]}"] == 37
            assert series[f"duanflow_gpu_utilization_percent{gpu[1]}"] == 0
            assert series[f"duanflow_gpu_memory_used_mib{gpu[0]}"] == 2048
            assert series["duanflow_agents"] >= 1
            deploy = f'service="router",subject="{subjects.API_DEPLOY}",outcome="ok"'
            assert series[f"duanflow_requests_total{{{deploy}}}"] >= 1  # the control API's own request metrics
    finally:
        with contextlib.suppress(Exception):
            await js.delete_consumer(subjects.STREAM_QUEUES, subjects.queue_consumer("main", queue))
        for name in (queue, f"l{unique}"):
            with contextlib.suppress(Exception):
                await js.purge_stream(subjects.STREAM_QUEUES, subject=subjects.queue("main", name))


@pytest.fixture
def mr_exporter() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    try:
        yield exporter
    finally:
        provider.shutdown()
        trace._TRACER_PROVIDER = None  # back to the API's default (records nothing) for the other tests
        trace._TRACER_PROVIDER_SET_ONCE = Once()


async def test_a_deploys_trace_continues_into_the_start_command(
    mr_exporter: InMemorySpanExporter, mr_router: int, infra: Any, nc_service: Any, unique: str
) -> None:
    key, digest = await mr_bundle(nc_service, unique)
    starts: list[StartReplica] = []
    headers: list[dict[str, str]] = []
    trace_id, parent_id = os.urandom(16).hex(), os.urandom(8).hex()
    async with mr_agent(infra, nc_service, f"ag-{unique}", starts, headers):
        fn = FunctionSpec(name="hello", gpu=["H100"], timeout_s=60)
        req = DeployRequest(
            spec=AppSpec(name=unique, module="hello_app", functions=[fn]), bundle_key=key, bundle_digest=digest
        )
        msg = await nc_service.request(
            subjects.API_DEPLOY, codec.encode(req), timeout=15, headers={"traceparent": f"00-{trace_id}-{parent_id}-01"}
        )
        decode_reply(msg.data, DeployReply)
    deploy = next(s for s in mr_exporter.get_finished_spans() if s.name == subjects.API_DEPLOY)
    assert f"{deploy.context.trace_id:032x}" == trace_id and deploy.parent is not None
    assert f"{deploy.parent.span_id:016x}" == parent_id  # the router's handler span continues the deployer's trace
    sent = headers[0]["traceparent"].split("-")
    assert sent[1] == trace_id and sent[2] == f"{deploy.context.span_id:016x}"  # ... and goes on to the agent

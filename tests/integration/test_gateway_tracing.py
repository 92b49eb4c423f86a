"""An HTTP request's W3C ``traceparent`` is continued through the gateway: its ``invoke`` span is a child of the
client's span, and the context travels on in the invocation's NATS headers to the replica, whose ``execute`` span
hangs off the gateway's (in-memory exporter, real NATS, the gateway in this process)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import msgspec
import pytest
from duanflow import _telemetry
from duanflow_gateway.app import GatewayApp, build_app
from duanflow_gateway.settings import Settings
from duanflow_proto import codec, subjects
from duanflow_proto.messages.invocation import HDR_REPLY, Invocation, Result
from duanflow_proto.messages.release import EndpointSpec, RouteEntry
from fixtures.waiting import eventually
from nats.js.api import AckPolicy, ConsumerConfig
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.util._once import Once

pytestmark = pytest.mark.timeout(60)

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"


def _reset_provider() -> None:
    trace._TRACER_PROVIDER = None
    trace._TRACER_PROVIDER_SET_ONCE = Once()


@pytest.fixture
def gw_exporter() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    _reset_provider()
    trace.set_tracer_provider(provider)
    try:
        yield exporter
    finally:
        provider.shutdown()
        _reset_provider()


@pytest.fixture
async def traced_gateway(infra: Any, gw_exporter: InMemorySpanExporter) -> AsyncIterator[GatewayApp]:
    settings = Settings(
        nats_url=infra.nats_url, nats_user="service", nats_password=infra.nats.service, http_port=0, env="main"
    )
    app = build_app(settings)
    task = asyncio.create_task(app.run())

    async def serving() -> bool:
        return app.http_port > 0 and app._routes is not None and app._routes.ready.is_set()

    try:
        await eventually(serving, timeout=20)
        yield app
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_incoming_traceparent_is_continued_to_the_replica(
    traced_gateway: GatewayApp, gw_exporter: InMemorySpanExporter, nc_service: Any, unique: str
) -> None:
    js = nc_service.jetstream()
    subject = subjects.invocation("main", unique, "echo")
    durable = subjects.consumer_name("main", unique, "echo")
    await js.add_consumer(
        subjects.STREAM_INVOCATIONS,
        ConsumerConfig(durable_name=durable, filter_subject=subject, ack_policy=AckPolicy.EXPLICIT, ack_wait=30),
    )
    pull = await js.pull_subscribe_bind(durable=durable, stream=subjects.STREAM_INVOCATIONS)
    received: list[dict[str, str]] = []

    async def replica() -> None:
        # A stand-in replica that opens its span as the real one does (duanflow._telemetry.serving).
        while True:
            with contextlib.suppress(Exception):
                for msg in await pull.fetch(1, timeout=1):
                    received.append(dict(msg.headers or {}))
                    inv = codec.decode(msg.data, Invocation)
                    with _telemetry.serving(msg, "echo"):
                        value = msgspec.json.encode({"ok": True})
                    result = Result(call_id=inv.call_id, ok=True, codec="json", value=value)
                    await nc_service.publish(msg.headers[HDR_REPLY], codec.encode(result))
                    await msg.ack()

    kv = await js.key_value(subjects.KV_ROUTES)
    entry = RouteEntry(
        method="GET",
        path=f"/{unique}/traced",
        env="main",
        app=unique,
        function="echo",
        release="rel_20260101_0000",
        subject=subject,
        endpoint=EndpointSpec(method="GET", path=f"/{unique}/traced"),
    )
    await kv.put(f"main.{unique}.echo", codec.encode(entry))
    task = asyncio.create_task(replica())
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{traced_gateway.http_port}", timeout=10) as http:

            async def answered() -> httpx.Response:
                resp = await http.get(f"/{unique}/traced", headers={"traceparent": f"00-{TRACE_ID}-{CLIENT_SPAN}-01"})
                assert resp.status_code == 200, resp.text
                return resp

            await eventually(answered, timeout=15)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await kv.delete(f"main.{unique}.echo")
        await js.delete_consumer(subjects.STREAM_INVOCATIONS, durable)

    spans = gw_exporter.get_finished_spans()
    invoke = [s for s in spans if s.name == "invoke echo"][-1]
    # The gateway's span continues the client's trace, as a child of the client's span.
    assert f"{invoke.context.trace_id:032x}" == TRACE_ID
    assert invoke.parent is not None and f"{invoke.parent.span_id:016x}" == CLIENT_SPAN
    # The NATS headers carry the gateway's span on to the replica...
    version, trace_id, parent_id, _ = received[-1]["traceparent"].split("-")
    assert (version, trace_id, parent_id) == ("00", TRACE_ID, f"{invoke.context.span_id:016x}")
    # ...whose execution span is the gateway span's child, in the same trace.
    execute = [s for s in spans if s.name == "execute echo"][-1]
    assert f"{execute.context.trace_id:032x}" == TRACE_ID
    assert execute.parent is not None and execute.parent.span_id == invoke.context.span_id

"""One ``.remote()`` yields one connected trace: the caller's spans (an in-memory exporter here) and the replica's
(a real ``python -m duanflow._runtime`` exporting over OTLP/HTTP because ``OTEL_EXPORTER_OTLP_ENDPOINT`` is set, to
a receiver in this test) share one trace id, linked parent to child through the NATS headers, both ways."""

from __future__ import annotations

import asyncio
import importlib
import os
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import nats
import pytest
from duanflow import _client, _telemetry
from duanflow._local import servers
from duanflow_kit.streams import ensure_streams
from duanflow_proto import subjects
from fixtures.otlp import Received, ReceivedSpan, otlp_receiver
from fixtures.waiting import eventually_sync
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.util._once import Once

pytestmark = pytest.mark.timeout(90)

TR_APP_SOURCE = """
import duanflow as df

app = df.App("{app}")


@app.function(timeout=30)
def double(x):
    return 2 * x
"""


@pytest.fixture
def tr_exporter() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    try:
        yield exporter
    finally:
        provider.shutdown()
        # back to the API's default (records nothing) for the other tests of this process
        trace._TRACER_PROVIDER = None
        trace._TRACER_PROVIDER_SET_ONCE = Once()


@pytest.fixture
def tr_receiver() -> Iterator[Received]:
    with otlp_receiver() as received:
        yield received


async def tr_setup(url: str, password: str, env: str, app: str) -> None:
    nc = await nats.connect(url, user="service", password=password)
    try:
        js = nc.jetstream()
        await ensure_streams(js)
        await js.add_consumer(
            subjects.STREAM_INVOCATIONS,
            ConsumerConfig(
                durable_name=subjects.consumer_name(env, app, "double"),
                deliver_policy=DeliverPolicy.ALL,
                ack_policy=AckPolicy.EXPLICIT,
                ack_wait=60,
                filter_subject=subjects.invocation(env, app, "double"),
            ),
        )
    finally:
        await nc.close()


def tr_pending(url: str, password: str, env: str, app: str) -> int:
    """Calls of ``double`` waiting in its consumer."""

    async def read() -> int:
        nc = await nats.connect(url, user="service", password=password)
        try:
            info = await nc.jetstream().consumer_info(
                subjects.STREAM_INVOCATIONS, subjects.consumer_name(env, app, "double")
            )
            return int(info.num_pending or 0)
        finally:
            await nc.close()

    return asyncio.run(read())


def tr_replica(
    url: str,
    creds: servers.NatsCredentials,
    tmp_path: Path,
    env: str,
    app: str,
    module_name: str,
    receiver: Received,
    **extra: str,
) -> subprocess.Popen[bytes]:
    """A real ``python -m duanflow._runtime`` serving ``double``, exporting its spans to ``receiver``."""
    renv = {k: v for k, v in os.environ.items() if not k.startswith(("DUANFLOW_", "OTEL_"))}
    renv.update(
        DUANFLOW_NATS_URL=url,
        DUANFLOW_NATS_USER="agent",
        DUANFLOW_NATS_PASSWORD=creds.agent,
        DUANFLOW_REPLICA_ID=f"rp-{uuid.uuid4().hex[:8]}",
        DUANFLOW_ENV=env,
        DUANFLOW_APP=app,
        DUANFLOW_RELEASE="rel_20260101_0000",
        DUANFLOW_FUNCTION="double",
        DUANFLOW_MODULE=module_name,
        DUANFLOW_STREAM=subjects.STREAM_INVOCATIONS,
        DUANFLOW_CONSUMER=subjects.consumer_name(env, app, "double"),
        DUANFLOW_CONCURRENCY="1",
        DUANFLOW_TIMEOUT_S="30",
        DUANFLOW_SIMULATED_GPU="1",
        CUDA_VISIBLE_DEVICES="",
        PYTHONPATH=os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]),
        OTEL_EXPORTER_OTLP_ENDPOINT=receiver.url,
        OTEL_BSP_SCHEDULE_DELAY="50",
        **extra,
    )
    return subprocess.Popen(
        [sys.executable, "-m", "duanflow._runtime"],
        cwd=tmp_path,
        env=renv,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


def tr_client(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, url: str, creds: servers.NatsCredentials, env: str
) -> None:
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("DUANFLOW_NATS_URL", url)
    monkeypatch.setenv("DUANFLOW_NATS_USER", "client")
    monkeypatch.setenv("DUANFLOW_NATS_PASSWORD", creds.client)
    monkeypatch.setenv("DUANFLOW_ENV", env)
    monkeypatch.setenv("DUANFLOW_HOME", str(tmp_path / "home"))
    _client.reset_client()


def tr_replica_spans(replica: subprocess.Popen[bytes], received: Received, names: set[str]) -> dict[str, ReceivedSpan]:
    """The replica's spans by name, once every one of ``names`` arrived at the receiver."""

    def arrived() -> dict[str, ReceivedSpan]:
        assert replica.poll() is None, replica.stdout.read() if replica.stdout else ""
        got = {s.name: s for s in received.spans}
        return got if names <= got.keys() else {}

    return eventually_sync(arrived, timeout=30)


def test_one_remote_call_is_one_connected_trace(
    nats_server: tuple[servers.Proc, servers.NatsCredentials],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    tr_exporter: InMemorySpanExporter,
    tr_receiver: Received,
) -> None:
    token = uuid.uuid4().hex[:8]
    env, app, module_name = f"e{token}", f"tr-{token}", f"traced_app_{token}"
    (tmp_path / f"{module_name}.py").write_text(textwrap.dedent(TR_APP_SOURCE.format(app=app)))
    url, creds = nats_server[0].address, nats_server[1]
    asyncio.run(tr_setup(url, creds.service, env, app))
    replica = tr_replica(url, creds, tmp_path, env, app, module_name, tr_receiver)
    tr_client(monkeypatch, tmp_path, url, creds, env)
    try:
        module = importlib.import_module(module_name)
        assert _telemetry.enabled()
        with trace.get_tracer("test").start_as_current_span("user request") as root:
            assert module.double.remote(21) == 42
        mine = {s.name: s for s in tr_exporter.get_finished_spans()}
        invoke = mine[f"invoke {app}.double"]
        trace_id = f"{root.get_span_context().trace_id:032x}"
        assert invoke.parent is not None and invoke.parent.span_id == root.get_span_context().span_id
        invoke_id = f"{invoke.context.span_id:016x}"
        theirs = tr_replica_spans(replica, tr_receiver, {"queue wait", "execute double", "result"})
        assert {s.trace_id for s in theirs.values()} == {trace_id}  # one trace, across processes
        assert theirs["queue wait"].parent_id == invoke_id and theirs["execute double"].parent_id == invoke_id
        assert theirs["result"].parent_id == theirs["execute double"].span_id
        # a second call, made once the replica is ready, did not wait on a cold start: none in its trace
        with trace.get_tracer("test").start_as_current_span("second request") as second:
            assert module.double.remote(1) == 2
        again = f"{second.get_span_context().trace_id:032x}"
        eventually_sync(lambda: tr_receiver.in_trace(again).keys() >= {"execute double", "result"})
        assert "cold start" not in tr_receiver.in_trace(again)
    finally:
        _client.reset_client()
        replica.terminate()
        replica.wait(15)


def test_a_call_that_waited_for_its_replica_shows_the_cold_start(
    nats_server: tuple[servers.Proc, servers.NatsCredentials],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    tr_exporter: InMemorySpanExporter,
    tr_receiver: Received,
) -> None:
    """The call is queued first; the replica starts afterwards: the call's trace holds the whole cold start (from
    the agent's start command, ``DUANFLOW_STARTED_NS``, to readiness) and its phases, next to the other spans."""
    token = uuid.uuid4().hex[:8]
    env, app, module_name = f"e{token}", f"tr-{token}", f"traced_cold_{token}"
    (tmp_path / f"{module_name}.py").write_text(textwrap.dedent(TR_APP_SOURCE.format(app=app)))
    url, creds = nats_server[0].address, nats_server[1]
    asyncio.run(tr_setup(url, creds.service, env, app))
    tr_client(monkeypatch, tmp_path, url, creds, env)
    results: list[int] = []
    module = importlib.import_module(module_name)
    replica: subprocess.Popen[bytes] | None = None
    try:
        with trace.get_tracer("test").start_as_current_span("user request") as root:
            ctx = otel_context.get_current()

            def call() -> None:
                otel_context.attach(ctx)  # the caller's trace, on the caller's thread
                results.append(module.double.remote(4))

            caller = threading.Thread(target=call, daemon=True)
            caller.start()
            eventually_sync(lambda: tr_pending(url, creds.service, env, app) == 1, timeout=20)
            started_ns = time.time_ns()
            replica = tr_replica(
                url, creds, tmp_path, env, app, module_name, tr_receiver, DUANFLOW_STARTED_NS=str(started_ns)
            )
            caller.join(30)
        assert results == [8]
        invoke = {s.name: s for s in tr_exporter.get_finished_spans()}[f"invoke {app}.double"]
        invoke_id = f"{invoke.context.span_id:016x}"
        names = {"queue wait", "cold start", "spawn", "load code", "connect", "execute double", "result"}
        theirs = tr_replica_spans(replica, tr_receiver, names)
        assert {theirs[n].trace_id for n in names} == {f"{root.get_span_context().trace_id:032x}"}
        cold = theirs["cold start"]
        assert cold.parent_id == invoke_id and theirs["execute double"].parent_id == invoke_id
        assert all(theirs[p].parent_id == cold.span_id for p in ("spawn", "load code", "connect"))
        assert cold.start_ns == started_ns and cold.end_ns == theirs["connect"].end_ns
        assert theirs["spawn"].start_ns == started_ns and theirs["load code"].start_ns == theirs["spawn"].end_ns
    finally:
        _client.reset_client()
        if replica is not None:
            replica.terminate()
            replica.wait(15)

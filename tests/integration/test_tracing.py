"""One ``.remote()`` yields one connected trace: the caller's spans (an in-memory exporter here) and the replica's
(a real ``python -m duanflow._runtime`` exporting over OTLP/HTTP because ``OTEL_EXPORTER_OTLP_ENDPOINT`` is set, to
a receiver in this test) share one trace id, linked parent to child through the NATS headers, both ways."""

from __future__ import annotations

import asyncio
import http.server
import importlib
import os
import subprocess
import sys
import textwrap
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nats
import pytest
from duanflow import _client, _telemetry
from duanflow._local import servers
from duanflow_kit.streams import ensure_streams
from duanflow_proto import subjects
from fixtures.waiting import eventually_sync
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from opentelemetry import trace
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
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


class TrReceiver(http.server.BaseHTTPRequestHandler):
    """An OTLP/HTTP trace receiver: keeps (trace id, span id, parent id, name) of every span posted."""

    spans: list[tuple[str, str, str, str]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        req = trace_service_pb2.ExportTraceServiceRequest()
        req.ParseFromString(body)
        for rs in req.resource_spans:
            for ss in rs.scope_spans:
                for s in ss.spans:
                    self.spans.append((s.trace_id.hex(), s.span_id.hex(), s.parent_span_id.hex(), s.name))
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.end_headers()
        self.wfile.write(trace_service_pb2.ExportTraceServiceResponse().SerializeToString())

    def log_message(self, *args: Any) -> None:
        return None


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
def tr_receiver() -> Iterator[str]:
    TrReceiver.spans = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), TrReceiver)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


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


def test_one_remote_call_is_one_connected_trace(
    nats_server: tuple[servers.Proc, servers.NatsCredentials],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    tr_exporter: InMemorySpanExporter,
    tr_receiver: str,
) -> None:
    token = uuid.uuid4().hex[:8]
    env, app, module_name = f"e{token}", f"tr-{token}", f"traced_app_{token}"
    (tmp_path / f"{module_name}.py").write_text(textwrap.dedent(TR_APP_SOURCE.format(app=app)))
    url, creds = nats_server[0].address, nats_server[1]
    asyncio.run(tr_setup(url, creds.service, env, app))
    replica_id = f"rp-{token}"
    renv = {k: v for k, v in os.environ.items() if not k.startswith(("DUANFLOW_", "OTEL_"))}
    renv.update(
        DUANFLOW_NATS_URL=url,
        DUANFLOW_NATS_USER="agent",
        DUANFLOW_NATS_PASSWORD=creds.agent,
        DUANFLOW_REPLICA_ID=replica_id,
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
        OTEL_EXPORTER_OTLP_ENDPOINT=tr_receiver,
        OTEL_BSP_SCHEDULE_DELAY="50",
    )
    replica = subprocess.Popen(
        [sys.executable, "-m", "duanflow._runtime"],
        cwd=tmp_path,
        env=renv,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("DUANFLOW_NATS_URL", url)
    monkeypatch.setenv("DUANFLOW_NATS_USER", "client")
    monkeypatch.setenv("DUANFLOW_NATS_PASSWORD", creds.client)
    monkeypatch.setenv("DUANFLOW_ENV", env)
    monkeypatch.setenv("DUANFLOW_HOME", str(tmp_path / "home"))
    _client.reset_client()
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

        def replica_spans() -> dict[str, tuple[str, str, str, str]]:
            assert replica.poll() is None, replica.stdout.read() if replica.stdout else ""
            got = {s[3]: s for s in TrReceiver.spans}
            return got if {"queue wait", "execute double", "result"} <= got.keys() else {}

        theirs = eventually_sync(replica_spans, timeout=30)
        assert {s[0] for s in theirs.values()} == {trace_id}  # one trace, across processes
        assert theirs["queue wait"][2] == invoke_id and theirs["execute double"][2] == invoke_id
        assert theirs["result"][2] == theirs["execute double"][1]
    finally:
        _client.reset_client()
        replica.terminate()
        replica.wait(15)

"""Trace context through services: off by default (no headers at all), the gateway's client span in the
invocation headers, and a service's request handler span as its child."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from duanflow import _telemetry
from duanflow_kit import telemetry
from duanflow_kit.settings import otlp_endpoint
from duanflow_proto import subjects
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.util._once import Once


def _reset_provider() -> None:
    trace._TRACER_PROVIDER = None
    trace._TRACER_PROVIDER_SET_ONCE = Once()


@pytest.fixture
def ts_exporter() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    try:
        yield exporter
    finally:
        provider.shutdown()
        _reset_provider()


def test_tracing_is_off_by_default_and_adds_nothing_to_messages() -> None:
    _reset_provider()
    assert not telemetry.enabled() and not _telemetry.enabled()
    headers: dict[str, str] = {}
    assert telemetry.start_client_span("invoke f", headers) is None and headers == {}
    assert _telemetry.result_headers() is None and _telemetry.current_headers() == {}
    assert otlp_endpoint({}) == "" and not telemetry.setup("duanflow-test", "")


def test_gateway_span_travels_to_the_service_handler(ts_exporter: InMemorySpanExporter) -> None:
    headers: dict[str, str] = {"Df-Reply": "x"}
    span = telemetry.start_client_span("invoke chat", headers)
    assert span is not None and headers["traceparent"].startswith("00-")
    with telemetry.handler_span(headers, subjects.API_LOG_QUERY):
        pass
    telemetry.end_span(span)
    spans = {s.name: s for s in ts_exporter.get_finished_spans()}
    client, server = spans["invoke chat"], spans[subjects.API_LOG_QUERY]
    assert server.context.trace_id == client.context.trace_id
    assert server.parent is not None and server.parent.span_id == client.context.span_id


def test_replica_spans_hang_off_the_callers_headers(ts_exporter: InMemorySpanExporter) -> None:
    class Msg:
        headers: dict[str, str] = {}

    with trace.get_tracer("t").start_as_current_span("caller") as caller:
        _telemetry.bind("fc-1")
        Msg.headers = {}
        _telemetry.inject(Msg.headers, "fc-1")
    with _telemetry.serving(Msg(), "f"):
        back = _telemetry.result_headers()
    assert back is not None and back["traceparent"].split("-")[1] == f"{caller.get_span_context().trace_id:032x}"
    spans = {s.name: s for s in ts_exporter.get_finished_spans()}
    assert spans["execute f"].parent is not None
    assert spans["execute f"].parent.span_id == caller.get_span_context().span_id
    assert spans["result"].parent is not None
    assert spans["result"].parent.span_id == spans["execute f"].context.span_id

"""OpenTelemetry traces of calls: the trace context travels in NATS headers (W3C ``traceparent``) from the caller
through the replica and back on the result.

Off by default and free then: nothing is recorded unless a tracer provider is installed, by the application
(an in-memory exporter in tests, its own set-up) or by :func:`setup_from_env` when the standard
``OTEL_EXPORTER_OTLP_ENDPOINT`` is set (OTLP over HTTP, batched). Spans:

- caller: ``invoke <app>.<function>`` (client kind) around ``.remote()`` / ``.remote.aio()``;
- replica: ``queue wait`` (from the stream's timestamp to the pull), ``execute <function>`` (server kind), and
  ``result`` (the answer's publish, whose headers carry the context back to the caller);
- replica, for a call that was queued before the replica was ready (it waited on a cold start): ``cold start``
  (from the agent's start command, ``DUANFLOW_STARTED_NS``, else this process's start, to readiness) with one
  child per phase: ``spawn`` (download and process start), ``load code`` (imports), ``enter`` (``@df.enter``
  hooks), ``connect`` (NATS and the consumer).
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from typing import Any, TypeVar

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind

T = TypeVar("T")

TRACER_NAME = "duanflow"
ENDPOINT_VAR = "OTEL_EXPORTER_OTLP_ENDPOINT"

_bound: dict[str, dict[str, str]] = {}
"""Trace headers of calls started on a caller's thread, by call id, taken by the loop thread that publishes."""
# "off" in one read of the API's set-once global (asked per call on hot paths). Asking for the provider once here
# lets the API install one named by OTEL_PYTHON_TRACER_PROVIDER, so afterwards "global unset" means "off" exactly.
trace.get_tracer_provider()
_FAST_OFF = hasattr(trace, "_TRACER_PROVIDER")
_setup_lock = threading.Lock()

STARTED_NS_VAR = "DUANFLOW_STARTED_NS"
"""Replica env set by the agent: when it got the start command (epoch ns)."""
_imported_ns = time.time_ns()  # the runtime imports this module first thing: about when the process started
_import_pid = os.getpid()
_started_ns = 0
"""``DUANFLOW_STARTED_NS`` (read by :func:`replica_starting`); 0: unknown."""
_phases: list[tuple[str, int]] = []
"""A replica's start-up phases in order: (name, when it ended, epoch ns)."""
_ready_ns = 0
"""When this replica announced readiness (0: not a replica, or not ready yet)."""
_set_up = False


def enabled() -> bool:
    """Whether a real tracer provider is installed (the API's default records nothing).

    Asked several times per call on the invocation path, so "off" costs one global read: until a provider is
    set, ``get_tracer_provider()`` looks ``OTEL_PYTHON_TRACER_PROVIDER`` up in the environment on every call
    (about 0.7 µs each time).
    """
    if _FAST_OFF and trace._TRACER_PROVIDER is None:
        # no provider set in code and none named by the environment: off
        return False
    provider = trace.get_tracer_provider()
    return not isinstance(provider, trace.ProxyTracerProvider | trace.NoOpTracerProvider)


def setup_from_env(service_name: str) -> bool:
    """Install an OTLP/HTTP exporting tracer provider when ``OTEL_EXPORTER_OTLP_ENDPOINT`` is set and no provider
    is installed yet; returns whether exporting is on. Safe to call many times."""
    global _set_up
    with _setup_lock:
        if _set_up or enabled():
            return enabled()
        _set_up = True
        if not os.environ.get(ENDPOINT_VAR):
            return False
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        trace.set_tracer_provider(provider)
        return True


def tracer() -> trace.Tracer:
    """The DuanFlow tracer of the installed provider."""
    return trace.get_tracer(TRACER_NAME)


@contextlib.contextmanager
def invoke_span(app: str, function: str) -> Iterator[None]:
    """The caller's span of one call (current while it runs: the call's headers carry it)."""
    if not enabled():
        yield
        return
    with tracer().start_as_current_span(
        f"invoke {app}.{function}",
        kind=SpanKind.CLIENT,
        attributes={"duanflow.app": app, "duanflow.function": function},
    ):
        yield


def bind(call_id: str) -> None:
    """On the caller's thread: remember the current trace context for ``call_id``'s publish (another thread)."""
    if enabled():
        headers: dict[str, str] = {}
        propagate.inject(headers)
        if headers:
            _bound[call_id] = headers


def inject(headers: dict[str, str], call_id: str = "") -> None:
    """Add the trace context of ``call_id`` (bound by :func:`bind`), else the current one, to NATS ``headers``."""
    bound = _bound.pop(call_id, None) if _bound else None
    if bound is not None:
        headers.update(bound)
    elif enabled():
        propagate.inject(headers)


def current_headers() -> dict[str, str]:
    """The current trace context as headers (empty when tracing is off)."""
    headers: dict[str, str] = {}
    if enabled():
        propagate.inject(headers)
    return headers


async def within(headers: Mapping[str, str], fn: Callable[..., Awaitable[T]], *args: Any) -> T:
    """Await ``fn(*args)`` with the trace context of ``headers`` current (hops from a caller's thread)."""
    if not headers:
        return await fn(*args)
    token = otel_context.attach(propagate.extract(headers))
    try:
        return await fn(*args)
    finally:
        otel_context.detach(token)


def replica_starting() -> None:
    """On a replica, first thing in the runtime's ``main()``: read ``DUANFLOW_STARTED_NS`` from the environment now
    (a zygote's child gets its environment after this module was imported), and take a forked child's start as
    now rather than its zygote's."""
    global _imported_ns, _started_ns
    if os.getpid() != _import_pid:
        _imported_ns = time.time_ns()
    started = os.environ.get(STARTED_NS_VAR, "")
    _started_ns = int(started) if started.isdigit() else 0
    _phases[:] = [("spawn", _imported_ns)] if 0 < _started_ns < _imported_ns else []


def startup_phase(name: str) -> None:
    """On a replica: the start-up phase ``name`` (``load code``, ``enter``) ended now."""
    _phases.append((name, time.time_ns()))


def replica_ready() -> None:
    """On a replica: it announced readiness now (the end of its cold start)."""
    global _ready_ns
    startup_phase("connect")
    _ready_ns = _phases[-1][1]


def _cold_start(t: trace.Tracer, parent: otel_context.Context) -> None:
    """The ``cold start`` span, and one child per phase, in the trace of a call that waited on it."""
    begin = _started_ns or _imported_ns
    span = t.start_span("cold start", context=parent, start_time=begin, attributes={"duanflow.cold_start": True})
    inside = trace.set_span_in_context(span)
    for name, end in _phases:
        if end > begin:
            t.start_span(name, context=inside, start_time=begin).end(end_time=end)
            begin = end
    span.end(end_time=_ready_ns)


@contextlib.contextmanager
def serving(msg: Any, function: str) -> Iterator[None]:
    """On a replica, around one input message: ``queue wait`` (from the stream's timestamp to now), ``cold start``
    when the message was queued before this replica was ready, and ``execute <function>`` as the current span, all
    children of the caller's context in the message's headers."""
    if not enabled():
        yield
        return
    parent = propagate.extract(dict(msg.headers or {}))
    t = tracer()
    queued_ns = 0
    with contextlib.suppress(Exception):  # not a JetStream message: no queue wait to show
        queued_ns = int(msg.metadata.timestamp.timestamp() * 1e9)
    if queued_ns:
        t.start_span("queue wait", context=parent, start_time=queued_ns).end()
        if queued_ns < _ready_ns:
            _cold_start(t, parent)
    with t.start_as_current_span(
        f"execute {function}", context=parent, kind=SpanKind.SERVER, attributes={"duanflow.function": function}
    ):
        yield


def result_headers() -> dict[str, str] | None:
    """Headers for a result's publish: a ``result`` span (child of the current one) carried back to the caller;
    None when tracing is off (no headers at all on the wire)."""
    if not enabled():
        return None
    headers: dict[str, str] = {}
    with tracer().start_as_current_span("result", kind=SpanKind.PRODUCER):
        propagate.inject(headers)
    return headers

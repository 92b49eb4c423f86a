"""OpenTelemetry for services: traces exported over OTLP/HTTP when ``OTEL_EXPORTER_OTLP_ENDPOINT`` is set (off by
default), and a server span around every request handler, child of the caller's context from the NATS headers."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Iterator, Mapping

from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind

TRACER_NAME = "duanflow.kit"
_lock = threading.Lock()


# "off" in one read of the API's set-once global (asked per call on hot paths). Asking for the provider once here
# lets the API install one named by OTEL_PYTHON_TRACER_PROVIDER, so afterwards "global unset" means "off" exactly.
trace.get_tracer_provider()
_FAST_OFF = hasattr(trace, "_TRACER_PROVIDER")


def enabled() -> bool:
    """Whether a real tracer provider is installed (the API's default records nothing)."""
    if _FAST_OFF and trace._TRACER_PROVIDER is None:
        return False
    return not isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider | trace.NoOpTracerProvider)


def setup(service_name: str, endpoint: str) -> bool:
    """Export this process's spans to ``endpoint`` (OTLP/HTTP, batched) unless a provider is installed already or
    ``endpoint`` is empty; returns whether tracing is on."""
    with _lock:
        if enabled() or not endpoint:
            return enabled()
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=f"{endpoint.rstrip('/')}/v1/traces")))
        trace.set_tracer_provider(provider)
        return True


@contextlib.contextmanager
def handler_span(headers: Mapping[str, str] | None, subject: str) -> Iterator[None]:
    """A server span around one request on ``subject`` (nothing when tracing is off)."""
    if not enabled():
        yield
        return
    parent = propagate.extract(dict(headers or {}))
    with trace.get_tracer(TRACER_NAME).start_as_current_span(
        subject, context=parent, kind=SpanKind.SERVER, attributes={"messaging.destination.name": subject}
    ):
        yield


@contextlib.contextmanager
def span(
    name: str, headers: Mapping[str, str] | None = None, attributes: Mapping[str, str | int] | None = None
) -> Iterator[trace.Span | None]:
    """An internal span named ``name``, child of the trace context in ``headers`` (a root span of its own trace
    when they carry none); yields None when tracing is off. An exception escaping it marks the span failed."""
    if not enabled():
        yield None
        return
    parent = propagate.extract(dict(headers or {}))
    with trace.get_tracer(TRACER_NAME).start_as_current_span(
        name, context=parent, attributes=dict(attributes or {})
    ) as current:
        yield current


def inject(headers: dict[str, str]) -> dict[str, str]:
    """``headers`` with the current trace context added (for a message a service publishes onward)."""
    if enabled():
        propagate.inject(headers)
    return headers


def start_client_span(name: str, headers: dict[str, str], parent: Mapping[str, str] | None = None) -> trace.Span | None:
    """Start a client span and put it in ``headers``; None when tracing is off. End it with :func:`end_span`.

    Its parent is the trace context in ``parent`` (e.g. an incoming HTTP request's W3C ``traceparent``) when that
    carries one, else the current context."""
    if not enabled():
        return None
    context = propagate.extract(parent) if parent else None
    span = trace.get_tracer(TRACER_NAME).start_span(name, context=context, kind=SpanKind.CLIENT)
    propagate.inject(headers, context=trace.set_span_in_context(span))
    return span


def end_span(span: trace.Span | None) -> None:
    """End a span from :func:`start_client_span` (None: nothing)."""
    if span is not None:
        span.end()


# --- metrics: OpenTelemetry instruments, read in-process and rendered in Prometheus' text format -----------------

LATENCY_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    """One process's meter (OpenTelemetry SDK, in-memory reader): request counts and latencies of the kit's
    handlers, plus whatever a service adds (:attr:`meter`); :meth:`prometheus` renders them for a scrape."""

    def __init__(self) -> None:
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import InMemoryMetricReader

        self._reader = InMemoryMetricReader()
        self.provider = MeterProvider(metric_readers=[self._reader])
        self.meter = self.provider.get_meter(TRACER_NAME)
        self.requests = self.meter.create_counter("duanflow_requests", description="Requests handled")
        self.latency = self.meter.create_histogram(
            "duanflow_request_duration_seconds",
            unit="s",
            description="Time to answer a request",
            explicit_bucket_boundaries_advisory=list(LATENCY_BUCKETS_S),
        )

    def observe(self, service: str, subject: str, seconds: float, ok: bool) -> None:
        """Count one handled request and its latency."""
        attrs = {"service": service, "subject": subject, "outcome": "ok" if ok else "error"}
        self.requests.add(1, attrs)
        self.latency.record(seconds, attrs)

    def prometheus(self) -> str:
        """Every metric in Prometheus' text exposition format (0.0.4)."""
        data = self._reader.get_metrics_data()
        out: list[str] = []
        for rm in data.resource_metrics if data else ():
            for sm in rm.scope_metrics:
                for metric in sm.metrics:
                    out.extend(_render(metric))
        return "\n".join(out) + "\n"


def _escape(value: str) -> str:
    r"""A label value escaped for Prometheus (backslash, quote, newline).

    >>> print(_escape('a"b\\c'))
    a\"b\\c
    """
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(attrs: Mapping[str, object], extra: str = "") -> str:
    parts = [f'{k}="{_escape(str(v))}"' for k, v in attrs.items()]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def _render(metric: object) -> list[str]:
    """Prometheus lines of one OpenTelemetry metric (sums as counters, histograms with cumulative buckets)."""
    from opentelemetry.sdk.metrics.export import Histogram, Sum

    name = getattr(metric, "name", "metric")
    data = getattr(metric, "data", None)
    lines = [f"# HELP {name} {getattr(metric, 'description', '') or name}"]
    if isinstance(data, Histogram):
        lines.append(f"# TYPE {name} histogram")
        for dp in data.data_points:
            running = 0
            for bound, count in zip((*dp.explicit_bounds, float("inf")), dp.bucket_counts, strict=True):
                running += count
                le = "+Inf" if bound == float("inf") else repr(float(bound))
                bucket = _labels(dp.attributes or {}, 'le="' + le + '"')
                lines.append(f"{name}_bucket{bucket} {running}")
            lines.append(f"{name}_sum{_labels(dp.attributes or {})} {dp.sum}")
            lines.append(f"{name}_count{_labels(dp.attributes or {})} {dp.count}")
    elif isinstance(data, Sum):
        total = f"{name}_total" if data.is_monotonic and not name.endswith("_total") else name
        lines.append(f"# TYPE {total if data.is_monotonic else name} {'counter' if data.is_monotonic else 'gauge'}")
        lines += [f"{total}{_labels(dp.attributes or {})} {dp.value}" for dp in data.data_points]
    else:
        lines.append(f"# TYPE {name} gauge")
        lines += [f"{name}{_labels(dp.attributes or {})} {dp.value}" for dp in getattr(data, "data_points", ())]
    return lines


_metrics: Metrics | None = None


def metrics() -> Metrics:
    """This process's :class:`Metrics` (made on first use)."""
    global _metrics
    with _lock:
        if _metrics is None:
            _metrics = Metrics()
        return _metrics


async def serve_prometheus(port: int, host: str = "0.0.0.0") -> asyncio.Server:
    """An HTTP endpoint answering every GET with :meth:`Metrics.prometheus` (``GET /metrics`` for a scraper)."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            body = metrics().prometheus().encode()
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\n"
                + f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                + body
            )
            await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    return await asyncio.start_server(answer, host, port)

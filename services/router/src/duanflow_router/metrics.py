"""The router's metrics (OpenTelemetry observable instruments, scraped with the kit's Prometheus endpoint):

- ``duanflow_queue_pending{stream,consumer,subject,kind}``: messages not yet delivered, per function consumer
  (``kind="function"``, stream ``DUANFLOW_INV``) and per work-queue consumer (``kind="queue"``, ``DUANFLOW_QUEUE``);
- ``duanflow_queue_ack_pending{...}``: delivered and not yet acknowledged (in flight on replicas);
- ``duanflow_queue_delivered_total{...}``: messages the consumer delivered so far (its delivered sequence);
- ``duanflow_queue_messages{subject}``: messages of each work queue's subject in ``DUANFLOW_QUEUE`` (what
  ``len(queue)`` says: waiting, running and awaiting a retry; also for a queue no worker consumes yet), and
  ``duanflow_dead_letters{subject}``: letters of each dead-letter subject in ``DUANFLOW_DLQ``;
- ``duanflow_replicas{env,app,function,state}``: replicas the router placed (``starting``, ``running``);
- ``duanflow_agents``: live agents in the fleet view;
- ``duanflow_gpu_utilization_percent{agent,gpu,gpu_type,simulated}`` and ``duanflow_gpu_memory_used_mib{...}``:
  each GPU as its agent's last capacity report has it (NVML on real GPUs; 0 on simulated ones).

Queue depths come from a :class:`QueueDepths` snapshot: :func:`poll_depths` lists the consumers of both streams on
a slow interval, and any other reader of consumer info (the autoscaler's pass) may :meth:`QueueDepths.record`
what it read, so the gauges show the freshest figure without a second read.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from duanflow_kit.telemetry import Metrics
from duanflow_proto import subjects
from nats.js import JetStreamContext
from opentelemetry.metrics import CallbackOptions, Observation

from duanflow_router.control import ControlPlane

log = logging.getLogger("duanflow.router.metrics")

DEPTH_STREAMS = {subjects.STREAM_INVOCATIONS: "function", subjects.STREAM_QUEUES: "queue"}
"""Streams whose consumers' depths are gauged, and the ``kind`` label of each."""
CONSUMER_PAGE = 256
"""Consumers per JetStream list page (the server's page size)."""


@dataclass(frozen=True, slots=True)
class ConsumerDepth:
    """One consumer's counts as last read from its consumer info."""

    stream: str
    consumer: str
    subject: str
    """The consumer's filter subject."""
    pending: int
    """``num_pending``: messages not yet delivered."""
    ack_pending: int
    """``num_ack_pending``: delivered, not yet acknowledged."""
    delivered: int = 0
    """``delivered.consumer_seq``: messages delivered so far."""
    read_at: float = 0.0
    """Monotonic time of the read."""


class QueueDepths:
    """The latest :class:`ConsumerDepth` by (stream, consumer), shared by whoever reads consumer info."""

    def __init__(self) -> None:
        self.by_consumer: dict[tuple[str, str], ConsumerDepth] = {}
        self.queue_messages: dict[str, int] = {}
        """Messages per work-queue subject in ``DUANFLOW_QUEUE``."""
        self.dead_letters: dict[str, int] = {}
        """Messages per dead-letter subject in ``DUANFLOW_DLQ``."""

    def record(
        self, stream: str, consumer: str, pending: int, ack_pending: int, *, subject: str = "", delivered: int = 0
    ) -> None:
        """Keep one consumer's counts (from ``consumer_info``: ``num_pending``, ``num_ack_pending``)."""
        held = self.by_consumer.get((stream, consumer))
        self.by_consumer[(stream, consumer)] = ConsumerDepth(
            stream=stream,
            consumer=consumer,
            subject=subject or (held.subject if held else ""),
            pending=pending,
            ack_pending=ack_pending,
            delivered=delivered or (held.delivered if held else 0),
            read_at=time.monotonic(),
        )

    def record_info(self, info: Any) -> None:
        """Keep the counts of a nats-py ``ConsumerInfo``."""
        delivered = getattr(info.delivered, "consumer_seq", 0) if info.delivered is not None else 0
        self.record(
            info.stream_name,
            info.name,
            int(info.num_pending or 0),
            int(info.num_ack_pending or 0),
            subject=(info.config.filter_subject or "") if info.config is not None else "",
            delivered=int(delivered or 0),
        )

    def keep_only(self, stream: str, consumers: Iterable[str]) -> None:
        """Forget the consumers of ``stream`` not in ``consumers`` (deleted since)."""
        alive = set(consumers)
        for key in [k for k in self.by_consumer if k[0] == stream and k[1] not in alive]:
            del self.by_consumer[key]


async def read_depths(js: JetStreamContext, depths: QueueDepths) -> int:
    """List every consumer of the gauged streams once into ``depths``; returns how many were read."""
    count = 0
    for stream in DEPTH_STREAMS:
        seen: list[str] = []
        offset = 0
        while True:
            page = await js.consumers_info(stream, offset=offset or None)
            for info in page:
                depths.record_info(info)
                seen.append(info.name)
            offset += len(page)
            if len(page) < CONSUMER_PAGE:
                break
        depths.keep_only(stream, seen)
        count += len(seen)
    depths.queue_messages = await _per_subject(js, subjects.STREAM_QUEUES, subjects.QUEUE_ALL)
    depths.dead_letters = await _per_subject(js, subjects.STREAM_DEAD_LETTERS, subjects.DLQ_ALL)
    return count


async def _per_subject(js: JetStreamContext, stream: str, wildcard: str) -> dict[str, int]:
    """Messages per subject of ``stream`` (one stream-info request)."""
    info = await js.stream_info(stream, subjects_filter=wildcard)
    return {str(k): int(v) for k, v in (info.state.subjects or {}).items()}


async def poll_depths(js: JetStreamContext, depths: QueueDepths, interval_s: float) -> None:
    """:func:`read_depths` every ``interval_s`` for as long as the router runs."""
    while True:
        try:
            await read_depths(js, depths)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a NATS hiccup: the gauges keep the last reading
            log.warning("could not read consumer depths: %s: %s", type(exc).__name__, exc)
        await asyncio.sleep(interval_s)


class RouterMetrics:
    """The router's instruments on one :class:`Metrics`; they read :attr:`control` and :attr:`depths` when
    scraped (an unattached router shows no series)."""

    def __init__(self, metrics: Metrics) -> None:
        self.control: ControlPlane | None = None
        self.depths = QueueDepths()
        m = metrics.meter
        m.create_observable_gauge(
            "duanflow_queue_pending", [self._depth("pending")], description="Messages waiting for a consumer"
        )
        m.create_observable_gauge(
            "duanflow_queue_ack_pending", [self._depth("ack_pending")], description="Messages in flight on replicas"
        )
        m.create_observable_counter(
            "duanflow_queue_delivered", [self._depth("delivered")], description="Messages a consumer delivered"
        )
        m.create_observable_gauge(
            "duanflow_queue_messages",
            [self._per_subject(lambda: self.depths.queue_messages)],
            description="Messages of a work queue (waiting, running, awaiting a retry)",
        )
        m.create_observable_gauge(
            "duanflow_dead_letters",
            [self._per_subject(lambda: self.depths.dead_letters)],
            description="Dead letters of a work queue",
        )
        m.create_observable_gauge("duanflow_replicas", [self._replicas], description="Replicas placed by the router")
        m.create_observable_gauge("duanflow_agents", [self._agents], description="Live agents")
        m.create_observable_gauge(
            "duanflow_gpu_utilization_percent", [self._gpu("utilization_pct")], description="GPU utilisation"
        )
        m.create_observable_gauge(
            "duanflow_gpu_memory_used_mib", [self._gpu("memory_used_mb")], description="GPU memory used (MiB)"
        )

    def attach(self, control: ControlPlane | None) -> None:
        """Report ``control``'s state (None: stop reporting it)."""
        self.control = control

    def _depth(self, field: str) -> Callable[[CallbackOptions], Iterable[Observation]]:
        def observe(options: CallbackOptions) -> Iterable[Observation]:
            for d in list(self.depths.by_consumer.values()):
                attrs = {
                    "stream": d.stream,
                    "consumer": d.consumer,
                    "subject": d.subject,
                    "kind": DEPTH_STREAMS.get(d.stream, "other"),
                }
                yield Observation(getattr(d, field), attrs)

        return observe

    @staticmethod
    def _per_subject(
        counts: Callable[[], dict[str, int]],
    ) -> Callable[[CallbackOptions], Iterable[Observation]]:
        def observe(options: CallbackOptions) -> Iterable[Observation]:
            return [Observation(n, {"subject": subject}) for subject, n in sorted(counts().items())]

        return observe

    def _replicas(self, options: CallbackOptions) -> Iterable[Observation]:
        control = self.control
        if control is None:
            return []
        counts: dict[tuple[str, str, str, str], int] = {}
        for rec in list(control.replicas.values()):
            key = (rec.env, rec.app, rec.function, rec.state)
            counts[key] = counts.get(key, 0) + 1
        return [
            Observation(n, {"env": env, "app": app, "function": fn, "state": state})
            for (env, app, fn, state), n in sorted(counts.items())
        ]

    def _agents(self, options: CallbackOptions) -> Iterable[Observation]:
        control = self.control
        return [] if control is None else [Observation(len(control.fleet))]

    def _gpu(self, field: str) -> Callable[[CallbackOptions], Iterable[Observation]]:
        def observe(options: CallbackOptions) -> Iterable[Observation]:
            control = self.control
            if control is None:
                return
            for report in control.fleet.reports():
                for g in report.gpus:
                    attrs = {
                        "agent": report.agent_id,
                        "gpu": str(g.index),
                        "gpu_type": g.gpu_type,
                        "simulated": str(g.simulated).lower(),
                    }
                    yield Observation(getattr(g, field), attrs)

        return observe


_installed: dict[int, RouterMetrics] = {}


def router_metrics(metrics: Metrics) -> RouterMetrics:
    """The router's instruments on ``metrics`` (made once per :class:`Metrics`: instruments cannot be removed)."""
    found = _installed.get(id(metrics))
    if found is None:
        found = _installed[id(metrics)] = RouterMetrics(metrics)
    return found

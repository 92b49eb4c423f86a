"""Agent commands, consumers, events, logs and the capacity KV bucket over NATS / JetStream."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from duanflow_kit import telemetry
from duanflow_kit.handlers import decode_reply
from duanflow_proto import codec, subjects
from duanflow_proto.errors import DeadlineExceededError, InvalidInputError, UnavailableError
from duanflow_proto.messages.agent import CapacityReport, StartReplica, StartReplicaReply, StopReplica
from duanflow_proto.messages.common import Ack
from duanflow_proto.messages.logs import LogLine
from duanflow_proto.messages.price import PriceUpdate
from duanflow_proto.messages.release import FunctionSpec, RouteEntry
from duanflow_proto.messages.scheduler import SchedulerDecision
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError, NoKeysError
from nats.js.errors import NotFoundError as JsNotFoundError

from duanflow_router.domain import function_consumer, route_key
from duanflow_router.ports import AgentGoneError, ConsumerLoad

log = logging.getLogger("duanflow.router.nats")

ACK_WAIT_MARGIN_S = 30.0
MAX_DELIVER_EXTRA = 5
MAX_ACK_PENDING = 100_000
STOP_TIMEOUT_S = 60.0


def function_consumer_config(env: str, app: str, fn: FunctionSpec) -> ConsumerConfig:
    """The durable pull consumer of one function, as docs/CONTRACTS.md fixes it."""
    return ConsumerConfig(
        durable_name=subjects.consumer_name(env, app, fn.name),
        deliver_policy=DeliverPolicy.ALL,
        ack_policy=AckPolicy.EXPLICIT,
        ack_wait=fn.timeout_s + ACK_WAIT_MARGIN_S,
        max_deliver=fn.retries + MAX_DELIVER_EXTRA,
        filter_subject=subjects.invocation(env, app, fn.name),
        max_ack_pending=MAX_ACK_PENDING,
    )


def queue_consumer_config(env: str, fn: FunctionSpec) -> ConsumerConfig:
    """The durable pull consumer of an ``@app.worker``'s queue on ``DUANFLOW_QUEUE`` (one per queue).

    Workers retry (nak with a delay) and dead-letter themselves after ``fn.retries``; ``max_deliver`` is the
    backstop for a job that kills every replica that runs it.
    """
    queue = fn.queue or ""
    return ConsumerConfig(
        durable_name=subjects.queue_consumer(env, queue),
        deliver_policy=DeliverPolicy.ALL,
        ack_policy=AckPolicy.EXPLICIT,
        ack_wait=fn.timeout_s + ACK_WAIT_MARGIN_S,
        max_deliver=fn.retries + MAX_DELIVER_EXTRA,
        filter_subject=subjects.queue(env, queue),
        max_ack_pending=MAX_ACK_PENDING,
    )


class NatsWakeups:
    """:class:`duanflow_router.ports.Wakeups` as core subscriptions (JetStream publishes are plain publishes)."""

    PENDING_MSGS = 16
    """Messages buffered per watch: the first one is all the autoscaler needs."""

    def __init__(self, nc: NatsClient) -> None:
        self.nc = nc

    async def watch(self, subject: str, on_message: Callable[[], None]) -> Any:
        """Subscribe; the returned subscription's ``unsubscribe`` ends the watch."""

        async def cb(_msg: Msg) -> None:
            on_message()

        return await self.nc.subscribe(subject, cb=cb, pending_msgs_limit=self.PENDING_MSGS)


class NatsAgentClient:
    """:class:`duanflow_router.ports.AgentClient` over core request/reply."""

    def __init__(self, nc: NatsClient) -> None:
        self.nc = nc

    async def _request(self, agent_id: str, verb: str, payload: bytes, timeout_s: float) -> bytes:
        subject = subjects.agent_command(agent_id, verb)
        try:
            # the current trace (a deploy's, an autoscaler's pass) continues on the agent: its cold start span
            msg = await self.nc.request(subject, payload, timeout=timeout_s, headers=telemetry.inject({}) or None)
        except NoRespondersError:
            raise AgentGoneError(
                f"agent {agent_id} is not answering commands (is it running?)", details={"agent": agent_id}
            ) from None
        except NatsTimeoutError:
            raise DeadlineExceededError(f"agent {agent_id} did not answer {verb} within {timeout_s:.0f}s") from None
        return msg.data

    async def start_replica(self, agent_id: str, command: StartReplica, timeout_s: float) -> StartReplicaReply:
        """Start one replica and wait for the agent's answer (sent once the replica is ready)."""
        data = await self._request(agent_id, "start", codec.encode(command), timeout_s)
        reply: StartReplicaReply = decode_reply(data, StartReplicaReply)
        return reply

    async def stop_replica(self, agent_id: str, command: StopReplica) -> None:
        """Ask the agent to drain and stop one replica."""
        data = await self._request(agent_id, "stop", codec.encode(command), STOP_TIMEOUT_S + command.grace_s)
        decode_reply(data, Ack)


class NatsPlatform:
    """:class:`duanflow_router.ports.Platform` on a JetStream context."""

    def __init__(self, js: JetStreamContext, nc: NatsClient | None = None) -> None:
        self.js = js
        self.nc = nc
        self._capacity_kv: Any = None
        self._routes_kv: Any = None
        self._prices_kv: Any = None
        self.on_consumer_info: Callable[[Any], None] | None = None
        """Called with every ``ConsumerInfo`` read here (the router's queue-depth gauges keep the freshest one)."""

    async def ensure_function_consumer(self, env: str, app: str, fn: FunctionSpec) -> None:
        """Create the consumer, or update it in place (same durable name: in-flight calls survive)."""
        if fn.queue:
            await self.js.add_consumer(subjects.STREAM_QUEUES, queue_consumer_config(env, fn))
            return
        await self.js.add_consumer(subjects.STREAM_INVOCATIONS, function_consumer_config(env, app, fn))

    async def consumer_load(self, env: str, app: str, fn: FunctionSpec) -> ConsumerLoad | None:
        """One JetStream consumer-info request (a round trip to the server) on the function's durable consumer."""
        stream, name = function_consumer(env, app, fn)
        try:
            info = await self.js.consumer_info(stream, name)
        except JsNotFoundError:
            return None
        if self.on_consumer_info is not None:
            self.on_consumer_info(info)
        return ConsumerLoad(
            pending=int(info.num_pending or 0),
            ack_pending=int(info.num_ack_pending or 0),
            delivered=int(info.delivered.consumer_seq or 0) if info.delivered is not None else 0,
        )

    async def publish_decision(self, decision: SchedulerDecision) -> None:
        """Publish to the events stream."""
        await self.js.publish(subjects.event("scheduler", "decision"), codec.encode(decision))

    async def publish_log(self, line: LogLine) -> None:
        """Publish to the logs stream."""
        await self.js.publish(subjects.logs(line.env, line.app, line.kind, line.source), codec.encode(line))

    async def routes(self) -> dict[str, RouteEntry]:
        """Every decodable entry of the routes bucket, by key."""
        if self._routes_kv is None:
            self._routes_kv = await self.js.key_value(subjects.KV_ROUTES)
        kv = self._routes_kv
        try:
            keys: list[str] = await kv.keys()
        except NoKeysError:
            return {}
        found: dict[str, RouteEntry] = {}
        for key in keys:
            try:
                entry = await kv.get(key)
                if entry.value:
                    found[key] = codec.decode(entry.value, RouteEntry)
            except Exception as exc:  # a deleted or garbage entry claims nothing
                log.debug("route %s unreadable: %r", key, exc)
        return found

    async def put_routes(self, env: str, app: str, routes: dict[str, RouteEntry]) -> None:
        """Put the app's endpoints in the routes bucket (the gateway watches it), then drop the stale ones."""
        if self._routes_kv is None:
            self._routes_kv = await self.js.key_value(subjects.KV_ROUTES)
        kv = self._routes_kv
        for key, entry in routes.items():
            await kv.put(key, codec.encode(entry))
        prefix = route_key(env, app, "")
        try:
            existing: list[str] = await kv.keys()
        except NoKeysError:
            return
        for key in existing:
            if key.startswith(prefix) and key not in routes:
                await kv.delete(key)

    async def _capacity(self) -> Any:
        if self._capacity_kv is None:
            self._capacity_kv = await self.js.key_value(subjects.KV_CAPACITY)
        return self._capacity_kv

    async def put_capacity(self, report: CapacityReport) -> None:
        """Store the report under the agent id in the capacity bucket (its TTL ages dead agents out)."""
        kv = await self._capacity()
        await kv.put(subjects.token(report.agent_id), codec.encode(report))

    async def delete_capacity(self, agent_id: str) -> None:
        """Delete the agent's entry in the capacity bucket."""
        kv = await self._capacity()
        await kv.delete(subjects.token(agent_id))

    async def capacity_reports(self) -> list[CapacityReport]:
        """Every decodable report in the capacity bucket; garbage values are skipped (and logged)."""
        kv = await self._capacity()
        try:
            keys: list[str] = await kv.keys()
        except NoKeysError:
            return []
        reports: list[CapacityReport] = []
        for key in keys:
            try:
                entry = await kv.get(key)
            except KeyNotFoundError:  # expired or deleted since the listing
                continue
            if not entry.value:
                continue
            try:
                reports.append(codec.decode(entry.value, CapacityReport))
            except InvalidInputError as exc:
                log.warning("ignoring capacity entry %s: %s", key, exc)
        return reports

    async def _prices(self) -> Any:
        if self._prices_kv is None:
            self._prices_kv = await self.js.key_value(subjects.KV_PRICES)
        return self._prices_kv

    async def stored_prices(self) -> list[PriceUpdate]:
        """Every decodable override in the prices bucket."""
        kv = await self._prices()
        try:
            keys: list[str] = await kv.keys()
        except NoKeysError:
            return []
        out: list[PriceUpdate] = []
        for key in keys:
            try:
                entry = await kv.get(key)
                if entry.value:
                    out.append(codec.decode(entry.value, PriceUpdate))
            except (KeyNotFoundError, InvalidInputError) as exc:
                log.warning("ignoring price entry %s: %s", key, exc)
        return out

    async def store_price(self, update: PriceUpdate) -> None:
        """Key ``<pool>`` or ``<pool>.<type>`` in the prices bucket."""
        kv = await self._prices()
        key = subjects.token(update.pool) + (f".{subjects.token(update.gpu_type)}" if update.gpu_type else "")
        await kv.put(key, codec.encode(update))

    async def publish_price(self, update: PriceUpdate) -> None:
        """Core publish on the pool's price subject."""
        if self.nc is None:
            raise UnavailableError("price feed not connected")
        await self.nc.publish(subjects.price(update.pool), codec.encode(update))


class NatsLease:
    """:class:`duanflow_router.ports.Lease` on the ``duanflow_leader`` bucket (its TTL ends a dead holder's lease).

    Routers sharing one Postgres schema are one cluster: the key is the schema, so separate stacks on one NATS
    (tests, several environments) each have their own leader.
    """

    def __init__(self, js: JetStreamContext, key: str = "router") -> None:
        self.js = js
        self.KEY = subjects.token(key)
        self._kv: Any = None
        self._revision = 0

    async def _bucket(self) -> Any:
        if self._kv is None:
            self._kv = await self.js.key_value(subjects.KV_LEADER)
        return self._kv

    async def acquire(self, holder: str) -> bool:
        """Create the key; fails while another holder's entry lives."""
        kv = await self._bucket()
        try:
            self._revision = await kv.create(self.KEY, holder.encode())
        except KeyWrongLastSequenceError:
            return False
        return True

    async def renew(self, holder: str) -> bool:
        """Update the key at the revision we wrote last; fails once someone else holds it."""
        kv = await self._bucket()
        try:
            self._revision = await kv.update(self.KEY, holder.encode(), last=self._revision)
        except (KeyWrongLastSequenceError, KeyNotFoundError):
            return False
        return True

    async def release(self, holder: str) -> None:
        """Delete the key if we still hold it."""
        kv = await self._bucket()
        try:
            entry = await kv.get(self.KEY)
        except KeyNotFoundError:
            return
        if entry.value == holder.encode():
            await kv.delete(self.KEY, last=entry.revision)

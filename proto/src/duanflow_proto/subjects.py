"""Every NATS subject, stream, consumer and KV bucket name DuanFlow uses.

This module is the single source of truth: no other module writes a subject as a string literal.

| name | pattern | kind | who publishes → who consumes |
|---|---|---|---|
| invocation | ``duanflow.inv.<env>.<app>.<function>`` | JS ``DUANFLOW_INV`` (work queue) | SDK, gateway → replicas |
| job invocation | ``duanflow.inv.<env>.<app>.<function>.<job>`` | JS ``DUANFLOW_INV`` | router → job replica |
| direct call | ``duanflow.direct.<env>.<app>.<function>`` | core request, queue group | gateway → endpoint replicas |
| replica load | ``duanflow.load.<env>.<app>.<function>`` | core NATS | endpoint replicas → router |
| queue | ``duanflow.queue.<env>.<queue>`` | JetStream ``DUANFLOW_QUEUE`` (work queue) | SDK → worker replicas |
| dead letter | ``duanflow.dlq.<env>.<queue>`` | JetStream ``DUANFLOW_DLQ`` (limits) | worker replicas → CLI |
| logs | ``duanflow.logs.<env>.<app>.<kind>.<source>`` | JS ``DUANFLOW_LOGS`` (limits) | all → log service, CLI |
| events | ``duanflow.evt.<domain>.<name>`` | JetStream ``DUANFLOW_EVENTS`` (limits) | services → services |
| job event | ``duanflow.evt.job.<job>`` | JetStream ``DUANFLOW_EVENTS`` (limits) | job replica → router |
| capacity | ``duanflow.agent.cap.<agent>`` | core NATS | agents → router |
| agent command | ``duanflow.agent.cmd.<agent>.<verb>`` | core request/reply | router → agent |
| replica ready | ``duanflow.agent.ready.<replica>`` | core NATS | replica → agent |
| control API | ``duanflow.api.<noun>.<verb>`` | core request/reply | SDK/CLI → services |
| health | ``duanflow.api.health.<service>`` | core request/reply | anyone → each service |
| build command | ``duanflow.build.cmd.start`` | core request/reply | router/CLI → builder |
| build done | ``duanflow.build.evt.done.<image>`` | core NATS | builder → waiters |
| price | ``duanflow.price.<pool>`` | core NATS | price feed → router |
| results inbox | ``_INBOX.<client>.<call>`` | core NATS | replica → caller |
| invocation ack | ``_INBOX.<client>.<call>.ack`` | core NATS | JetStream PubAck, ``Df-Busy``, 503 → gateway |

Request/reply subjects are never captured by a stream: a stream would answer with its PubAck.

KV buckets: ``duanflow_capacity`` (agent reports, TTL), ``duanflow_routes`` (gateway route table),
``duanflow_results`` (results of spawned calls, TTL), ``duanflow_cancels`` (ids of cancelled calls, TTL; watched
by replicas), ``duanflow_prices``, ``duanflow_leader``.
"""

from __future__ import annotations

import re
from typing import Final

PREFIX: Final = "duanflow"

# Streams
STREAM_INVOCATIONS: Final = "DUANFLOW_INV"
STREAM_QUEUES: Final = "DUANFLOW_QUEUE"
STREAM_DEAD_LETTERS: Final = "DUANFLOW_DLQ"
STREAM_LOGS: Final = "DUANFLOW_LOGS"
STREAM_EVENTS: Final = "DUANFLOW_EVENTS"

# Durable consumers with fixed names (per-function consumers: :func:`consumer_name`)
CONSUMER_LOGS_ARCHIVER: Final = "logs_archiver"
"""The log service's archiver on ``DUANFLOW_LOGS``; every log-service instance shares it."""

# KV buckets
KV_CAPACITY: Final = "duanflow_capacity"
KV_ROUTES: Final = "duanflow_routes"
KV_RESULTS: Final = "duanflow_results"
KV_CANCELS: Final = "duanflow_cancels"
"""Cancelled calls: key = call id (``FunctionCall.cancel()``); replicas watch it and skip or stop those inputs."""
KV_PRICES: Final = "duanflow_prices"
KV_LEADER: Final = "duanflow_leader"

# Stream subject filters
INV_ALL: Final = f"{PREFIX}.inv.>"
QUEUE_ALL: Final = f"{PREFIX}.queue.>"
DLQ_ALL: Final = f"{PREFIX}.dlq.>"
LOGS_ALL: Final = f"{PREFIX}.logs.>"
EVENTS_ALL: Final = f"{PREFIX}.evt.>"
CAPACITY_ALL: Final = f"{PREFIX}.agent.cap.*"
PRICE_ALL: Final = f"{PREFIX}.price.*"
API_ALL: Final = f"{PREFIX}.api.>"
DIRECT_ALL: Final = f"{PREFIX}.direct.>"
LOAD_ALL: Final = f"{PREFIX}.load.>"
DIRECT_QUEUE: Final = "replicas"
"""Queue group of an endpoint's replicas on its direct subject (each call reaches one of them)."""

SERVICES: Final = ("router", "builder", "gateway", "agent", "logs")

_TOKEN = re.compile(r"^[a-z0-9][a-z0-9_-]{0,127}$")


def token(value: str) -> str:
    """Return ``value`` as one safe subject token: lowercase, no dots, spaces or wildcards.

    >>> token("Hello-GPU")
    'hello-gpu'
    """
    lowered = value.strip().lower()
    if not _TOKEN.match(lowered):
        raise ValueError(
            f"{value!r} cannot be used as a name: use 1-128 of a-z, 0-9, '-' and '_', starting with a letter or digit"
        )
    return lowered


def invocation(env: str, app: str, function: str) -> str:
    """Subject that carries invocations of one function."""
    return f"{PREFIX}.inv.{token(env)}.{token(app)}.{token(function)}"


def direct(env: str, app: str, function: str) -> str:
    """Core request subject of one endpoint's warm replicas (queue group :data:`DIRECT_QUEUE`): the gateway's fast
    path, which skips the stream. A replica that cannot take the call at once answers ``Df-Busy``; with no replica
    subscribed the server answers 503 (no responders); either way the gateway publishes to :func:`invocation`."""
    return f"{PREFIX}.direct.{token(env)}.{token(app)}.{token(function)}"


def replica_load(env: str, app: str, function: str) -> str:
    """Subject replicas report the load of their direct path on (``ReplicaLoad``); the router listens."""
    return f"{PREFIX}.load.{token(env)}.{token(app)}.{token(function)}"


def consumer_next(stream: str, consumer: str) -> str:
    """JetStream API subject a replica sends its pull requests to (``{"batch": n, "expires": ns}``)."""
    return f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{consumer}"


def consumer_name(env: str, app: str, function: str) -> str:
    """Durable consumer name of one function: stable across releases so in-flight calls survive a deploy."""
    return f"fn_{token(env)}_{token(app)}_{token(function)}".replace("-", "_")


def job_invocation(env: str, app: str, function: str, job_id: str) -> str:
    """Subject of the one invocation of a job: below its function's subject, outside that function's consumer."""
    return f"{invocation(env, app, function)}.{token(job_id)}"


def job_consumer(job_id: str) -> str:
    """Durable consumer of one job on ``DUANFLOW_INV`` (its dedicated replica pulls its one input from it)."""
    return f"job_{token(job_id)}".replace("-", "_")


def job_event(job_id: str) -> str:
    """Subject a job's replica reports on (``JobEvent``: running, then how it ended); the router listens."""
    return event("job", job_id)


def queue(env: str, name: str) -> str:
    """Subject of one work queue."""
    return f"{PREFIX}.queue.{token(env)}.{token(name)}"


def queue_consumer(env: str, name: str) -> str:
    """Durable consumer of one work queue on ``DUANFLOW_QUEUE``: the queue's workers share it (one per queue)."""
    return f"q_{token(env)}_{token(name)}".replace("-", "_")


def dead_letter(env: str, name: str) -> str:
    """Dead-letter subject of one work queue."""
    return f"{PREFIX}.dlq.{token(env)}.{token(name)}"


def logs(env: str, app: str, kind: str, source: str) -> str:
    """Subject of log lines of one app, kind and source."""
    return f"{PREFIX}.logs.{token(env)}.{token(app)}.{token(kind)}.{token(source)}"


def logs_filter(env: str, app: str, kind: str | None = None) -> str:
    """Filter subject for reading the log lines of one app (optionally one kind)."""
    return f"{PREFIX}.logs.{token(env)}.{token(app)}.{token(kind) if kind else '*'}.*"


def event(domain: str, name: str) -> str:
    """Subject of an event on the events stream."""
    return f"{PREFIX}.evt.{token(domain)}.{token(name)}"


def capacity(agent: str) -> str:
    """Subject an agent publishes its capacity reports on."""
    return f"{PREFIX}.agent.cap.{token(agent)}"


def agent_command(agent: str, verb: str) -> str:
    """Request/reply subject of one command to one agent."""
    return f"{PREFIX}.agent.cmd.{token(agent)}.{token(verb)}"


def agent_commands(agent: str) -> str:
    """Wildcard of every command to one agent (the agent subscribes to this)."""
    return f"{PREFIX}.agent.cmd.{token(agent)}.*"


def replica_ready(replica: str) -> str:
    """Subject a replica announces readiness on (its agent listens)."""
    return f"{PREFIX}.agent.ready.{token(replica)}"


def api(noun: str, verb: str) -> str:
    """Control request/reply subject."""
    return f"{PREFIX}.api.{token(noun)}.{token(verb)}"


def health(service: str) -> str:
    """Health request/reply subject of one service."""
    return api("health", service)


BUILD_START: Final = f"{PREFIX}.build.cmd.start"


def build_done(image_id: str) -> str:
    """Subject announcing that one image is built."""
    return f"{PREFIX}.build.evt.done.{token(image_id)}"


def price(pool: str) -> str:
    """Price-feed subject of one pool."""
    return f"{PREFIX}.price.{token(pool)}"


# Control API subjects
API_BUNDLE_UPLOAD: Final = api("bundle", "upload_url")
API_DEPLOY: Final = api("release", "deploy")
API_RELEASES: Final = api("release", "list")
API_FUNCTION_LOOKUP: Final = api("function", "lookup")
API_FLEET: Final = api("fleet", "list")
API_LOG_QUERY: Final = api("logs", "query")
API_PAYLOAD_URL: Final = api("payload", "url")
"""``PayloadUrlRequest`` → ``PayloadUrlReply``: presigned URL of one large argument or result (router)."""
API_PRICE_SET: Final = api("price", "set")
"""``PriceUpdate`` → ``PriceList``: set one pool's live price (the router stores it and tells every router)."""
API_PRICE_LIST: Final = api("price", "list")
"""``HealthRequest`` → ``PriceList``: the live price overrides."""
API_SECRET_CREATE: Final = api("secret", "create")
"""``SecretCreateRequest`` → ``SecretInfo``: store one secret, encrypted (router)."""
API_SECRET_LIST: Final = api("secret", "list")
"""``SecretListRequest`` → ``SecretList``: names and key names, never values (router)."""
API_SECRET_DELETE: Final = api("secret", "delete")
"""``SecretDeleteRequest`` → ``SecretInfo``: delete one secret (router)."""
API_APP_STOP: Final = api("app", "stop")
"""``AppStopRequest`` → ``AppStopReply``: deactivate an app and stop its replicas (router)."""
API_QUEUE_INSPECT: Final = api("queue", "inspect")
"""``QueueRequest`` → ``QueueInfo``: depth, in flight and dead letters of one work queue (router)."""
API_QUEUE_DEAD: Final = api("queue", "dead")
"""``QueueRequest`` → ``DeadLetterList``: the dead letters of one work queue, oldest first (router)."""
API_QUEUE_REPLAY: Final = api("queue", "replay")
"""``QueueRequest`` → ``QueueReplayReply``: put dead letters back on their queue (router)."""
API_STORAGE_URL: Final = api("storage", "url")
"""``StorageRequest`` → ``StorageReply``: presigned URL of one ``s3://bucket/key`` object, or whether it exists."""
API_STORAGE_LIST: Final = api("storage", "list")
"""``StorageRequest`` → ``StorageReply``: keys under a prefix (router)."""
API_JOB_SUBMIT: Final = api("job", "submit")
"""``JobSubmit`` → ``JobInfo``: start one run of a job function on dedicated GPUs (router)."""
API_JOB_LIST: Final = api("job", "list")
"""``JobListRequest`` → ``JobList``: jobs newest first (router)."""
API_JOB_STATUS: Final = api("job", "status")
"""``JobRef`` → ``JobInfo``: one job's state, times and error (router)."""
API_JOB_CANCEL: Final = api("job", "cancel")
"""``JobRef`` → ``JobInfo``: cancel a job (its replica is stopped and its GPUs freed) (router)."""
JOB_EVENTS_ALL: Final = f"{PREFIX}.evt.job.*"
"""Every job's events (the router subscribes)."""


PUB_ACK_SUFFIX: Final = ".ack"


def pub_ack(reply: str) -> str:
    """Where the gateway asks the PubAck of an invocation to go: beside its result inbox, ``<reply>.ack``.

    >>> pub_ack("_INBOX.abc.fc-1")
    '_INBOX.abc.fc-1.ack'
    """
    return f"{reply}{PUB_ACK_SUFFIX}"

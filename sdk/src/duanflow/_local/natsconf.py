"""NATS server configuration with one user per role (client, agent, service): never an open server."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from duanflow_proto import subjects

INV = subjects.STREAM_INVOCATIONS
QUEUE = subjects.STREAM_QUEUES
LOGS = subjects.STREAM_LOGS
RESULTS_KV = f"KV_{subjects.KV_RESULTS}"
CANCELS_KV = f"KV_{subjects.KV_CANCELS}"

_HOLE = "holex"


def wildcard(subject_of: Callable[..., str], *, wild: str = "*", tail: str = "") -> str:
    """The subject ``subject_of`` builds, with every token it takes as a wildcard (``>`` for the last one).

    Derived from :mod:`duanflow_proto.subjects`, so the permissions follow the subjects they guard.
    ``tail`` replaces the last argument's wildcard (``>``: anything below).
    """
    argc = subject_of.__code__.co_argcount
    parts = subject_of(*[f"{_HOLE}{i}" for i in range(argc)]).split(".")
    out = [wild if p.startswith(_HOLE) else p for p in parts]
    if tail:
        last = max(i for i, p in enumerate(parts) if p.startswith(_HOLE))
        out = [*out[:last], tail]
    return ".".join(out)


INBOX = "_INBOX.>"
"""Reply inboxes (NATS' own convention, not a DuanFlow subject)."""

# What each role may publish / subscribe to. Services may do anything; agents (and the replicas they
# start, which use the agent's credentials) may pull work, answer callers and write logs; clients may
# invoke, call the control API (builds included), read logs and spawned results.
ROLE_PERMISSIONS: dict[str, dict[str, list[str]]] = {
    "service": {"publish": [">"], "subscribe": [">"]},
    "agent": {
        "publish": [
            subjects.CAPACITY_ALL,
            wildcard(subjects.replica_ready),
            wildcard(subjects.job_event),
            subjects.LOGS_ALL,
            subjects.DLQ_ALL,
            subjects.QUEUE_ALL,
            subjects.INV_ALL,
            subjects.API_ALL,
            subjects.LOAD_ALL,
            INBOX,
            "$JS.ACK.>",
            "$JS.API.INFO",
            f"$JS.API.CONSUMER.MSG.NEXT.{INV}.>",
            f"$JS.API.CONSUMER.MSG.NEXT.{QUEUE}.>",
            f"$JS.API.CONSUMER.INFO.{INV}.>",
            f"$JS.API.CONSUMER.INFO.{QUEUE}.>",
            f"$JS.API.STREAM.INFO.{INV}",
            f"$JS.API.STREAM.INFO.{QUEUE}",
            f"$JS.API.STREAM.INFO.{RESULTS_KV}",
            f"$KV.{subjects.KV_RESULTS}.>",
            # replicas watch the cancelled calls (an ordered consumer) but cannot cancel anything
            f"$JS.API.STREAM.INFO.{CANCELS_KV}",
            f"$JS.API.CONSUMER.CREATE.{CANCELS_KV}",
            f"$JS.API.CONSUMER.CREATE.{CANCELS_KV}.>",
            f"$JS.API.CONSUMER.DELETE.{CANCELS_KV}.>",
            f"$JS.API.CONSUMER.INFO.{CANCELS_KV}.>",
        ],
        "subscribe": [
            wildcard(subjects.agent_command, tail=">"),
            wildcard(subjects.replica_ready),
            subjects.health("agent"),
            subjects.DIRECT_ALL,  # endpoint replicas take the gateway's direct calls (as they may pull any input)
            INBOX,
        ],
    },
    "client": {
        "publish": [
            subjects.INV_ALL,
            subjects.QUEUE_ALL,
            subjects.API_ALL,
            subjects.BUILD_START,
            "$JS.API.INFO",
            f"$JS.API.STREAM.INFO.{LOGS}",
            f"$JS.API.STREAM.INFO.{QUEUE}",
            f"$JS.API.STREAM.INFO.{RESULTS_KV}",
            f"$JS.API.CONSUMER.CREATE.{LOGS}.>",
            f"$JS.API.CONSUMER.CREATE.{LOGS}",
            f"$JS.API.CONSUMER.DELETE.{LOGS}.>",
            f"$JS.API.CONSUMER.MSG.NEXT.{LOGS}.>",
            f"$JS.API.CONSUMER.INFO.{QUEUE}.>",
            f"$JS.API.DIRECT.GET.{RESULTS_KV}.>",
            f"$JS.API.STREAM.MSG.GET.{RESULTS_KV}",
            f"$JS.API.STREAM.INFO.{CANCELS_KV}",
            f"$JS.API.DIRECT.GET.{CANCELS_KV}.>",
            f"$JS.API.STREAM.MSG.GET.{CANCELS_KV}",
            f"$KV.{subjects.KV_CANCELS}.>",  # FunctionCall.cancel()
            f"$JS.API.STREAM.MSG.GET.{LOGS}",  # duanflow logs: where the stream's part of an app starts
            f"$JS.ACK.{LOGS}.>",
        ],
        "subscribe": [INBOX],
    },
}

# Replicas run user code with the agent's credentials: the control calls that change the platform (deploys,
# secrets, prices, stopping apps) are denied to that role even though it may call the read-only ones.
ROLE_PUBLISH_DENY: dict[str, list[str]] = {
    "agent": [
        subjects.API_DEPLOY,
        subjects.API_BUNDLE_UPLOAD,
        subjects.API_SECRET_CREATE,
        subjects.API_SECRET_LIST,
        subjects.API_SECRET_DELETE,
        subjects.API_APP_STOP,
        subjects.API_PRICE_SET,
        subjects.API_JOB_SUBMIT,
        subjects.API_JOB_CANCEL,
        subjects.BUILD_START,
    ],
}


def render(
    *,
    port: int,
    store_dir: Path,
    passwords: dict[str, str],
    host: str = "127.0.0.1",
    http_port: int | None = None,
    max_payload: int = 8 * 1024 * 1024,
) -> str:
    """The nats-server config text (JSON is valid NATS config syntax)."""
    users = []
    for role, password in passwords.items():
        perms = ROLE_PERMISSIONS[role]
        users.append(
            {
                "user": role,
                "password": password,
                "permissions": {
                    "publish": {"allow": perms["publish"], "deny": ROLE_PUBLISH_DENY.get(role, [])},
                    "subscribe": {"allow": perms["subscribe"]},
                    "allow_responses": True,
                },
            }
        )
    conf: dict[str, object] = {
        "host": host,
        "port": port,
        "max_payload": max_payload,
        "jetstream": {"store_dir": str(store_dir), "max_memory_store": 256 * 1024 * 1024},
        "authorization": {"users": users},
    }
    if http_port:
        conf["http_port"] = http_port
    return json.dumps(conf, indent=2)

"""NATS server configuration with one user per role (client, agent, service): never an open server."""

from __future__ import annotations

import json
from pathlib import Path

from duanflow_proto import subjects

INV = subjects.STREAM_INVOCATIONS
QUEUE = subjects.STREAM_QUEUES
LOGS = subjects.STREAM_LOGS
RESULTS_KV = f"KV_{subjects.KV_RESULTS}"

# What each role may publish / subscribe to. Services may do anything; agents (and the replicas they
# start, which use the agent's credentials) may pull work, answer callers and write logs; clients may
# invoke, call the control API, read logs and spawned results.
ROLE_PERMISSIONS: dict[str, dict[str, list[str]]] = {
    "service": {"publish": [">"], "subscribe": [">"]},
    "agent": {
        "publish": [
            "duanflow.agent.cap.*",
            "duanflow.agent.ready.*",
            "duanflow.logs.>",
            "duanflow.dlq.>",
            "duanflow.queue.>",
            "duanflow.inv.>",
            "duanflow.api.>",
            "_INBOX.>",
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
        ],
        "subscribe": ["duanflow.agent.cmd.>", "duanflow.agent.ready.*", "duanflow.api.health.agent", "_INBOX.>"],
    },
    "client": {
        "publish": [
            "duanflow.inv.>",
            "duanflow.queue.>",
            "duanflow.api.>",
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
            f"$JS.ACK.{LOGS}.>",
        ],
        "subscribe": ["_INBOX.>"],
    },
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
                    "publish": {"allow": perms["publish"]},
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

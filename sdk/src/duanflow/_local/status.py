"""``duanflow dev status``: the health of each component of a local stack, checked the way each speaks.

NATS: a client connection; Postgres: ``pg_isready``; S3: the stack's bucket; services: their health request
over NATS (the gateway also over HTTP). The agent's inventory is marked simulated where it is.
"""

from __future__ import annotations

import asyncio
from dataclasses import asdict, dataclass, field
from typing import Any
from urllib.parse import urlsplit

from duanflow_proto.messages.common import HealthReply

from duanflow._local import processes, servers
from duanflow._local.health import NatsProbe, http_ok, postgres_ready, s3_bucket_ok
from duanflow._local.state import StackCredentials, StackState

GATEWAY_HEALTH_PATH = "/healthz"


@dataclass
class ComponentHealth:
    """Health of one component as ``dev status`` shows it."""

    name: str
    healthy: bool
    pid: int
    address: str
    log: str
    alive: bool
    detail: str = ""
    simulated: bool | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (``simulated`` only for the agent)."""
        out = asdict(self)
        out.pop("name")
        if self.simulated is None:
            out.pop("simulated")
        return out


@dataclass
class StackStatus:
    """Health of a local stack: ``running`` when any of its processes runs, ``healthy`` when all are healthy."""

    data_dir: str
    running: bool
    healthy: bool
    components: dict[str, ComponentHealth] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The ``dev status --json`` object."""
        return {
            "healthy": self.healthy,
            "running": self.running,
            "data_dir": self.data_dir,
            "components": {name: c.to_dict() for name, c in self.components.items()},
        }


async def check_all(state: StackState, creds: StackCredentials, wait_s: float) -> dict[str, ComponentHealth]:
    comps: dict[str, ComponentHealth] = {}
    for name, c in state.components.items():
        alive = processes.same_process(c.pid, c.create_time)
        comps[name] = ComponentHealth(
            name=name, healthy=False, pid=c.pid, address=c.address, log=c.log, alive=alive,
            detail="" if alive else "process not running",
        )  # fmt: skip

    probe: NatsProbe | None = None
    nats = comps.get("nats")
    if nats is not None and nats.alive:
        try:
            probe = await NatsProbe.connect(state.nats_url, "client", creds.nats["client"], connect_timeout=wait_s)
            nats.healthy, nats.detail = True, "accepts client connections"
        except Exception as exc:
            nats.detail = f"connect failed: {type(exc).__name__}: {exc}"

    async def check_postgres(h: ComponentHealth) -> None:
        url = urlsplit(state.postgres_dsn)
        ok = await asyncio.to_thread(postgres_ready, url.hostname or servers.LOOPBACK, url.port or 5432)
        h.healthy, h.detail = ok, "accepting connections" if ok else "pg_isready failed"

    async def check_s3(h: ComponentHealth) -> None:
        ok = await asyncio.to_thread(
            s3_bucket_ok, state.s3_endpoint, creds.s3_access_key, creds.s3_secret_key, state.s3_bucket
        )
        h.healthy, h.detail = ok, f"bucket {state.s3_bucket}" if ok else f"bucket {state.s3_bucket} not reachable"

    async def check_service(h: ComponentHealth) -> None:
        if h.name == "agent":
            h.simulated = state.simulated
        if probe is None:
            h.detail = "NATS unreachable"
            return
        try:
            reply = await probe.health(h.name, reply_timeout=wait_s)
        except Exception as exc:
            h.detail = f"no health reply: {type(exc).__name__}"
            return
        h.healthy = reply.ok
        h.detail = ", ".join(f"{k}={v}" for k, v in sorted(reply.details.items()) if k != "instance")
        if h.name == "gateway" and h.healthy:
            url = f"{state.gateway_url}{GATEWAY_HEALTH_PATH}"
            h.healthy = await asyncio.to_thread(http_ok, url, wait_s)
            if not h.healthy:
                h.detail = f"NATS ok, but {url} does not answer"
        if h.name == "agent":
            h.simulated = _reply_says_simulated(reply) or state.simulated

    checks = []
    for h in comps.values():
        if not h.alive:
            if h.name == "agent":
                h.simulated = state.simulated
            continue
        if h.name == "postgres":
            checks.append(check_postgres(h))
        elif h.name == "s3":
            checks.append(check_s3(h))
        elif h.name != "nats":
            checks.append(check_service(h))
    try:
        await asyncio.gather(*checks)
    finally:
        if probe is not None:
            await probe.close()
    return comps


def _reply_says_simulated(reply: HealthReply) -> bool:
    return any(
        "simulated" in k.lower() and v.strip().lower() not in ("", "0", "false", "no") for k, v in reply.details.items()
    )

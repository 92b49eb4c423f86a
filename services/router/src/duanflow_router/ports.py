"""What the router's use cases need from the outside world, as Protocols (adapters implement them)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from duanflow_proto.errors import UnavailableError
from duanflow_proto.messages.agent import CapacityReport, StartReplica, StartReplicaReply, StopReplica
from duanflow_proto.messages.logs import LogLine
from duanflow_proto.messages.price import PriceUpdate
from duanflow_proto.messages.release import FunctionSpec, Release, RouteEntry
from duanflow_proto.messages.scheduler import SchedulerDecision


@dataclass(frozen=True)
class ReplicaRecord:
    """One replica the router placed."""

    replica_id: str
    env: str
    app: str
    release_id: str
    function: str
    agent_id: str
    gpu_indices: tuple[int, ...] = ()
    state: str = "running"


@dataclass(frozen=True, slots=True)
class ConsumerLoad:
    """One read of a function's durable consumer: the autoscaler's view of its backlog and activity."""

    pending: int
    """Messages not yet delivered to any replica (``num_pending``)."""
    ack_pending: int
    """Messages delivered and not yet acknowledged: inputs in flight (``num_ack_pending``)."""
    delivered: int
    """The consumer's delivered sequence: unchanged between two reads means no new delivery."""


class ReleaseStore(Protocol):
    """Durable apps, releases, functions and replicas (Postgres)."""

    async def ping(self) -> None:
        """Raise when the store is unreachable."""

    async def release_ids(self, env: str, app: str, prefix: str) -> set[str]:
        """Release ids of ``env``/``app`` starting with ``prefix``."""

    async def insert_release(self, release: Release) -> bool:
        """Store a new (inactive) release and its functions; False when its id is already taken."""

    async def activate(self, env: str, app: str, release_id: str) -> str | None:
        """Make ``release_id`` the active release of its app; returns the previously active id."""

    async def active_release(self, env: str, app: str) -> Release | None:
        """The active release of one app, if any."""

    async def list_releases(self, env: str, app: str) -> list[Release]:
        """Releases of one app newest first, or the active release of every app when ``app`` is empty."""

    async def record_replica(self, replica: ReplicaRecord) -> None:
        """Insert or update one replica."""

    async def set_replica_state(self, replica_id: str, state: str) -> None:
        """Change the state of one replica (``running``, ``stopped``, ``failed``)."""

    async def running_replicas(self, env: str | None = None, app: str | None = None) -> list[ReplicaRecord]:
        """Replicas in state ``running`` (optionally of one app)."""


class BlobStore(Protocol):
    """Object storage for source bundles (S3)."""

    async def exists(self, key: str) -> bool:
        """Whether ``key`` is stored."""

    async def presign_put(self, key: str, expires_s: int) -> str:
        """A URL clients can PUT ``key`` to, reachable from outside the stack."""

    async def presign_get(self, key: str, expires_s: int) -> str:
        """A URL agents can GET ``key`` from."""


class AgentGoneError(UnavailableError):
    """Nothing answers on an agent's command subject: the agent is not running (its ``details["agent"]``)."""


class AgentClient(Protocol):
    """Commands to agents."""

    async def start_replica(self, agent_id: str, command: StartReplica, timeout_s: float) -> StartReplicaReply:
        """Start one replica and wait until it is ready to pull (raises a DuanFlowError otherwise; AgentGoneError when
        no agent listens on its command subject)."""

    async def stop_replica(self, agent_id: str, command: StopReplica) -> None:
        """Drain and stop one replica."""


class Platform(Protocol):
    """Messaging the router does besides agent commands: consumers, events, logs, soft state."""

    async def ensure_function_consumer(self, env: str, app: str, fn: FunctionSpec) -> None:
        """Create or update the durable pull consumer of one function on the invocations stream."""

    async def consumer_load(self, env: str, app: str, fn: FunctionSpec) -> ConsumerLoad | None:
        """Backlog and activity of the function's durable consumer (its queue's for a worker); None when absent."""

    async def publish_decision(self, decision: SchedulerDecision) -> None:
        """Publish a scheduler decision event."""

    async def publish_log(self, line: LogLine) -> None:
        """Publish one log line to the logs stream."""

    async def routes(self) -> dict[str, RouteEntry]:
        """Every entry of the routes KV bucket by key (unreadable ones left out)."""

    async def put_routes(self, env: str, app: str, routes: dict[str, RouteEntry]) -> None:
        """Make ``routes`` (by key) the app's entries in the routes KV bucket, deleting its other entries."""

    async def put_capacity(self, report: CapacityReport) -> None:
        """Store an agent's latest report in the capacity KV bucket."""

    async def delete_capacity(self, agent_id: str) -> None:
        """Remove an agent's report from the capacity KV bucket (it said it is leaving)."""

    async def capacity_reports(self) -> list[CapacityReport]:
        """Every report in the capacity KV bucket (its TTL drops agents that stopped reporting)."""

    async def stored_prices(self) -> list[PriceUpdate]:
        """Every live price override in the prices KV bucket."""

    async def store_price(self, update: PriceUpdate) -> None:
        """Keep one override in the prices KV bucket (a restarted or standby router reloads it)."""

    async def publish_price(self, update: PriceUpdate) -> None:
        """Announce one override on the pool's price-feed subject (every router applies it)."""


class Lease(Protocol):
    """The leader lease in a KV bucket: one active router at a time."""

    async def acquire(self, holder: str) -> bool:
        """Take the lease if nobody holds it; True when ``holder`` now holds it."""

    async def renew(self, holder: str) -> bool:
        """Keep the lease; False when it was lost (expired and taken by another)."""

    async def release(self, holder: str) -> None:
        """Give the lease up (clean shutdown), so a standby takes over at once."""


class ActiveReleases(Protocol):
    """Which release of every app is active (the autoscaler scans them)."""

    async def active_release_ids(self) -> list[tuple[str, str, str]]:
        """(env, app, release id) of every app with an active release."""


class Wakeups(Protocol):
    """Core subscriptions on invocation subjects, held while a function has no replica (scale from zero)."""

    async def watch(self, subject: str, on_message: Callable[[], None]) -> Unwatch:
        """Call ``on_message`` (synchronously, no payload kept) for each message seen on ``subject``."""


class Unwatch(Protocol):
    """Ends one watch."""

    async def unsubscribe(self) -> None:
        """Stop watching (idempotent)."""

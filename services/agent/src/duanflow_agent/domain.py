"""The agent's rules, pure: inventory, capacity reports, replica environment, bundle safety, failure messages.

No transport here (no faststream, nats, subprocess or HTTP): the supervisor and the adapters do the I/O.
"""

from __future__ import annotations

import re
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import PurePath, PurePosixPath

from duanflow_proto import subjects
from duanflow_proto.errors import ConflictError, DeadlineExceededError, InvalidInputError, RemoteError
from duanflow_proto.messages.agent import CapacityReport, GpuInfo, ReplicaInfo, StartReplica

from duanflow_agent import catalog

STARTING = "starting"
READY = "ready"
STOPPING = "stopping"
EXITED = "exited"

AGENT_STREAM = "agent"
"""``LogLine.stream`` of the agent's own notes about a replica (unexpected exits, dropped lines)."""

STDERR_TAIL_LINES = 20
"""Lines of a replica's stderr kept to explain why it died."""

_NOT_TOKEN = re.compile(r"[^a-z0-9_-]+")
_DIGEST = re.compile(r"^[0-9a-f]{64}$")


def default_agent_id(hostname: str) -> str:
    """An agent id from a host name, safe as a subject token.

    >>> default_agent_id("GPU-Box.example.com")
    'ag-gpu-box-example-com'
    """
    tail = _NOT_TOKEN.sub("-", hostname.lower()).strip("-") or "host"
    return subjects.token(f"ag-{tail}"[:128])


@dataclass(frozen=True, slots=True)
class Inventory:
    """The GPUs of a host and where that knowledge came from."""

    gpus: tuple[GpuInfo, ...] = ()
    """GPUs by index."""
    simulated: bool = False
    """True when declared, not read from NVML."""
    driver_version: str = ""
    """NVIDIA driver version."""
    cuda_version: str = ""
    """CUDA driver version (``12.4``)."""


def declared_inventory(spec: str) -> Inventory:
    """A simulated inventory from a declaration such as ``H100:2,L4:1`` (indices in declaration order)."""
    gpus: list[GpuInfo] = []
    for gpu_type, count in catalog.parse_inventory(spec):
        entry = catalog.lookup(gpu_type)
        memory = entry.memory_mb if entry else 0
        for _ in range(count):
            index = len(gpus)
            gpus.append(
                GpuInfo(
                    index=index,
                    uuid=f"sim-{gpu_type.lower()}-{index}",
                    gpu_type=gpu_type,
                    name=f"Simulated {gpu_type}",
                    memory_total_mb=memory,
                    simulated=True,
                )
            )
    return Inventory(gpus=tuple(gpus), simulated=True)


def simulated_catalog_inventory() -> Inventory:
    """One simulated GPU of each catalog type."""
    return declared_inventory(",".join(f"{name}:1" for name in catalog.types()))


def choose_inventory(*, probed: Inventory | None, declared: str, simulate: bool) -> Inventory:
    """Which inventory the agent reports.

    A declaration (``gpus``) always wins and is marked simulated; otherwise NVML's reading when there is one;
    otherwise one GPU of each catalog type when ``simulate`` is on; otherwise CPU only.
    """
    if declared.strip():
        return declared_inventory(declared)
    if probed is not None and probed.gpus:
        return probed
    if simulate:
        return simulated_catalog_inventory()
    return probed or Inventory()


@dataclass(slots=True)
class Replica:
    """What the agent knows about one replica it started."""

    cmd: StartReplica
    """The command that started it."""
    started_at: float = field(default_factory=time.monotonic)
    """Monotonic time the start command arrived."""
    started_ns: int = field(default_factory=time.time_ns)
    """Wall-clock time the start command arrived (epoch ns; the replica's ``DUANFLOW_STARTED_NS``)."""
    pid: int = 0
    """Process id once spawned."""
    state: str = STARTING
    """``starting``, ``ready``, ``stopping`` or ``exited``."""
    exit_code: int | None = None
    """Exit status once exited (negative: killed by that signal)."""
    exited_at: float = 0.0
    """Monotonic time it exited."""
    stderr_tail: deque[str] = field(default_factory=lambda: deque(maxlen=STDERR_TAIL_LINES))
    """Last stderr lines, to explain a death."""

    def info(self) -> ReplicaInfo:
        """This replica as reported to the router."""
        c = self.cmd
        return ReplicaInfo(
            replica_id=c.replica_id,
            env=c.env,
            app=c.app,
            function=c.function,
            release=c.release,
            pid=self.pid,
            gpu_indices=list(c.gpu_indices),
            state=self.state,
        )


def capacity_report(
    *,
    agent_id: str,
    host: str,
    region: str,
    labels: dict[str, str],
    inventory: Inventory,
    cpu_count: int,
    memory_mb: int,
    prices: dict[str, float],
    replicas: list[ReplicaInfo],
    ts_ms: int,
    interval_s: float,
) -> CapacityReport:
    """One capacity report from the agent's current knowledge."""
    return CapacityReport(
        agent_id=agent_id,
        host=host,
        region=region,
        labels=labels,
        gpus=list(inventory.gpus),
        cpu_count=cpu_count,
        memory_mb=memory_mb,
        driver_version=inventory.driver_version,
        cuda_version=inventory.cuda_version,
        prices=prices,
        replicas=replicas,
        simulated=inventory.simulated,
        ts_ms=ts_ms,
        interval_s=interval_s,
    )


def validate_start(cmd: StartReplica, inventory: Inventory) -> None:
    """Refuse a start command this agent cannot honour (bad names, unknown GPUs, bad numbers)."""
    try:
        for value in (cmd.replica_id, cmd.env, cmd.app, cmd.function):
            subjects.token(value)
    except ValueError as exc:
        raise InvalidInputError(str(exc)) from None
    if not cmd.module or not all(part.isidentifier() for part in cmd.module.split(".")):
        raise InvalidInputError(f"module {cmd.module!r} is not an importable module name")
    if cmd.concurrency < 1:
        raise InvalidInputError(f"concurrency must be at least 1, not {cmd.concurrency}")
    if cmd.timeout_s <= 0:
        raise InvalidInputError(f"timeout_s must be positive, not {cmd.timeout_s}")
    if len(set(cmd.gpu_indices)) != len(cmd.gpu_indices):
        raise InvalidInputError(f"gpu_indices {cmd.gpu_indices} name a GPU twice")
    known = {g.index for g in inventory.gpus}
    unknown = [i for i in cmd.gpu_indices if i not in known]
    if unknown:
        have = ", ".join(f"{g.index}:{g.gpu_type}" for g in inventory.gpus) or "none"
        raise InvalidInputError(f"GPU indices {unknown} do not exist on this agent (GPUs: {have})")
    bundle_digest(cmd.bundle_digest)


def bundle_digest(digest: str) -> str:
    """The bare lowercase sha256 hex of a bundle digest (``sha256:`` prefix allowed); also a safe dir name."""
    bare = digest.strip().lower().removeprefix("sha256:")
    if not _DIGEST.match(bare):
        raise InvalidInputError(f"bundle_digest {digest!r} is not a sha256 hex digest")
    return bare


def replica_env(
    cmd: StartReplica,
    *,
    base: dict[str, str],
    bundle_dir: str,
    nats_url: str,
    nats_user: str,
    nats_password: str,
    simulated_gpu: bool,
) -> dict[str, str]:
    """The environment of a replica process (CONTRACTS.md, agent → replica).

    ``simulated_gpu``: the replica holds declared GPUs that are not real; ``DUANFLOW_SIMULATED_GPU=1`` and an
    empty ``CUDA_VISIBLE_DEVICES`` tell its runtime so. The bundle dir comes first on ``PYTHONPATH``.
    """
    env = dict(base)
    env.update(cmd.env_vars)
    pythonpath = env.get("PYTHONPATH", "")
    env.update(
        {
            "DUANFLOW_NATS_URL": nats_url,
            "DUANFLOW_NATS_USER": nats_user,
            "DUANFLOW_NATS_PASSWORD": nats_password,
            "DUANFLOW_REPLICA_ID": cmd.replica_id,
            "DUANFLOW_ENV": cmd.env,
            "DUANFLOW_APP": cmd.app,
            "DUANFLOW_RELEASE": cmd.release,
            "DUANFLOW_FUNCTION": cmd.function,
            "DUANFLOW_MODULE": cmd.module,
            "DUANFLOW_STREAM": cmd.stream,
            "DUANFLOW_CONSUMER": cmd.consumer,
            "DUANFLOW_CONCURRENCY": str(cmd.concurrency),
            "DUANFLOW_TIMEOUT_S": repr(float(cmd.timeout_s)),
            "DUANFLOW_SIMULATED_GPU": "1" if simulated_gpu else "0",
            # Simulated GPUs do not exist: the replica must not try to open a device.
            "CUDA_VISIBLE_DEVICES": "" if simulated_gpu else ",".join(str(i) for i in cmd.gpu_indices),
            # The GPUs the router reserved for it, simulated or not (jobs and tests see their placement).
            "DUANFLOW_GPU_INDICES": ",".join(str(i) for i in cmd.gpu_indices),
            "PYTHONPATH": bundle_dir + (":" + pythonpath if pythonpath else ""),
            "PYTHONUNBUFFERED": "1",
        }
    )
    return env


STARTED_NS_VAR = "DUANFLOW_STARTED_NS"
"""Replica env: when the agent got the start command (epoch ns), so the replica's ``cold start`` span in a
waiting call's trace covers download and spawn too, not only its own imports."""


def safe_member(name: str) -> PurePosixPath:
    """The relative path a zip member may be extracted to; path traversal and absolute paths are refused.

    >>> safe_member("pkg/mod.py")
    PurePosixPath('pkg/mod.py')
    """
    path = PurePosixPath(name.replace("\\", "/"))
    if not name or path.is_absolute() or ".." in path.parts or (path.parts and ":" in path.parts[0]):
        raise InvalidInputError(f"bundle member {name!r} escapes the bundle directory", details={"member": name})
    return path


def is_live(replica: Replica) -> bool:
    """Whether a replica still holds its GPUs (starting, ready or stopping)."""
    return replica.state in (STARTING, READY, STOPPING)


def live_replicas(replicas: Iterable[Replica]) -> list[ReplicaInfo]:
    """What the capacity report lists: live replicas only (an exited one has given its GPUs back)."""
    return [r.info() for r in replicas if is_live(r)]


def held_gpus(replicas: Iterable[Replica]) -> set[int]:
    """GPU indices held by live replicas."""
    return {i for r in replicas if is_live(r) for i in r.cmd.gpu_indices}


def free_gpus(inventory: Inventory, replicas: Iterable[Replica]) -> list[GpuInfo]:
    """GPUs of the inventory that no live replica holds."""
    held = held_gpus(replicas)
    return [g for g in inventory.gpus if g.index not in held]


def check_gpus_free(cmd: StartReplica, replicas: Iterable[Replica]) -> None:
    """Refuse to hand a GPU that a live replica holds to another replica."""
    others = [r for r in replicas if r.cmd.replica_id != cmd.replica_id]
    busy = sorted(held_gpus(others) & set(cmd.gpu_indices))
    if busy:
        owners = sorted(r.cmd.replica_id for r in others if is_live(r) and set(r.cmd.gpu_indices) & set(busy))
        raise ConflictError(
            f"GPU(s) {busy} are held by replica(s) {', '.join(owners)}: stop them first or pick free GPUs",
            details={"gpu_indices": ",".join(map(str, busy)), "held_by": ",".join(owners)},
        )


def replica_log_path(work_dir: PurePath, replica_id: str) -> PurePath:
    """Where the agent keeps the full output of one replica."""
    return work_dir / "logs" / f"{subjects.token(replica_id)}.log"


def _explain(replica: Replica, log_path: PurePath) -> tuple[str, dict[str, str]]:
    c = replica.cmd
    tail = "\n".join(replica.stderr_tail)
    log_subject = subjects.logs(c.env, c.app, "runtime", c.replica_id)
    text = (
        f"; last stderr lines:\n{tail}" if tail else " (no stderr output)"
    ) + f"\nfull log: {log_path} on agent host (and `duanflow logs {c.app} --kind runtime`, subject {log_subject})"
    details = {"replica_id": c.replica_id, "log_path": str(log_path), "log_subject": log_subject}
    return text, details


def exit_description(code: int | None) -> str:
    """``exited with code 1`` / ``was killed by signal 9``.

    >>> exit_description(-9)
    'was killed by signal 9'
    """
    return f"was killed by signal {-code}" if code is not None and code < 0 else f"exited with code {code}"


def exited_early(replica: Replica, log_path: PurePath) -> RemoteError:
    """The error answered when a replica dies before it is ready: exit code, last stderr lines, log path."""
    c = replica.cmd
    text, details = _explain(replica, log_path)
    message = (
        f"replica {c.replica_id} of {c.app}.{c.function} {exit_description(replica.exit_code)} before it was ready"
    )
    return RemoteError(
        message + text,
        details={**details, "exit_code": str(replica.exit_code)},
        traceback="\n".join(replica.stderr_tail) or None,
    )


def not_ready_in_time(replica: Replica, log_path: PurePath, timeout_s: float) -> DeadlineExceededError:
    """The error answered when a replica does not announce readiness within the start timeout."""
    c = replica.cmd
    text, details = _explain(replica, log_path)
    message = f"replica {c.replica_id} of {c.app}.{c.function} was not ready within {timeout_s:g}s and was stopped"
    return DeadlineExceededError(message + text, details=details)


def death_notice(replica: Replica) -> str:
    """The log line published when a replica that was not asked to stop exits."""
    c = replica.cmd
    return (
        f"[duanflow: replica {c.replica_id} of {c.app}.{c.function} {exit_description(replica.exit_code)} "
        "unexpectedly; it was removed from the agent's capacity report]"
    )


def forget_exited(replicas: dict[str, Replica], now: float, keep_s: float) -> list[str]:
    """Ids of exited replicas reported long enough (``keep_s``) to be forgotten."""
    return [rid for rid, r in replicas.items() if r.state == EXITED and now - r.exited_at > keep_s]

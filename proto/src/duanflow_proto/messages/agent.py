"""Agent capacity reports and replica commands."""

from __future__ import annotations

import msgspec


class GpuInfo(msgspec.Struct, frozen=True, kw_only=True, tag="duanflow.v1.agent.gpu", tag_field="type"):
    """One GPU as an agent sees it."""

    index: int
    """Index on the host (what ``CUDA_VISIBLE_DEVICES`` names)."""
    uuid: str
    """NVML uuid (``sim-...`` for a simulated GPU)."""
    gpu_type: str
    """Canonical catalog type (``H100``, ``L40S``, ...)."""
    name: str = ""
    """Name as the driver reports it."""
    memory_total_mb: int = 0
    """Total memory in MiB."""
    memory_used_mb: int = 0
    """Used memory in MiB."""
    utilization_pct: int = 0
    """GPU utilisation in percent."""
    temperature_c: int = 0
    """Temperature in degrees Celsius."""
    healthy: bool = True
    """False when NVML reports a fault."""
    simulated: bool = False
    """True when this GPU is declared, not read from hardware."""


class ReplicaInfo(msgspec.Struct, frozen=True, kw_only=True, tag="duanflow.v1.agent.replica", tag_field="type"):
    """One replica an agent runs."""

    replica_id: str
    """Replica id (``rp-...``)."""
    env: str
    """Environment."""
    app: str
    """App name."""
    function: str
    """Function name."""
    release: str
    """Release id."""
    pid: int = 0
    """Process id (process runtime)."""
    gpu_indices: list[int] = []
    """GPUs it holds."""
    state: str = "starting"
    """``starting``, ``ready``, ``stopping`` or ``exited``."""


class CapacityReport(msgspec.Struct, frozen=True, kw_only=True, tag="duanflow.v1.agent.capacity", tag_field="type"):
    """What one agent has, published every few seconds (soft state with a TTL)."""

    agent_id: str
    """Agent id (``ag-...``)."""
    host: str
    """Host name."""
    region: str = "local"
    """Region label."""
    labels: dict[str, str] = {}
    """Free-form labels."""
    gpus: list[GpuInfo] = []
    """GPUs on the host."""
    cpu_count: int = 0
    """Logical CPUs."""
    memory_mb: int = 0
    """Host memory in MiB."""
    driver_version: str = ""
    """NVIDIA driver version (empty without NVML)."""
    cuda_version: str = ""
    """CUDA driver version (empty without NVML)."""
    prices: dict[str, float] = {}
    """$/GPU-hour per GPU type, from the agent's configuration."""
    replicas: list[ReplicaInfo] = []
    """Replicas running on the host."""
    simulated: bool = False
    """True when the GPU inventory is declared rather than read through NVML."""
    ts_ms: int = 0
    """When the report was made (epoch ms)."""
    interval_s: float = 2.0
    """Seconds between reports; the router deems the agent dead after several missed beats."""
    cached_images: list[str] = []
    """Image ids cached on the host's disk (latency placement prefers them)."""
    runtimes: list[str] = []
    """How this agent can run replicas: ``process``, and ``docker`` when its docker runtime is configured."""
    leaving: bool = False
    """The agent is stopping: its last report. Routers drop it from the fleet at once and ignore any older report
    still in flight (which would otherwise store it again as live)."""


class StartReplica(msgspec.Struct, frozen=True, kw_only=True, tag="duanflow.v1.agent.start_replica", tag_field="type"):
    """Router → agent: start one replica of one function of one release."""

    replica_id: str
    """Replica id chosen by the router."""
    env: str
    """Environment."""
    app: str
    """App name."""
    release: str
    """Release id."""
    function: str
    """Function name."""
    module: str
    """Module to import from the bundle (by name)."""
    bundle_url: str
    """Presigned URL of the source bundle (a zip)."""
    bundle_digest: str
    """sha256 of the bundle, also the agent's cache key."""
    image_id: str = ""
    """Image to run in (empty: the agent's own environment)."""
    stream: str
    """Stream holding the function's invocations."""
    consumer: str
    """Durable consumer the replica pulls from."""
    concurrency: int = 1
    """Inputs in flight at once."""
    timeout_s: float = 300.0
    """Per-input timeout."""
    gpu_indices: list[int] = []
    """GPUs to expose through ``CUDA_VISIBLE_DEVICES``."""
    env_vars: dict[str, str] = {}
    """Extra environment (app env and secrets)."""
    image_url: str = ""
    """Presigned GET URL of the packed venv image ``image_id`` (empty: nothing to download)."""
    secret_keys: list[str] = []
    """Names in ``env_vars`` whose values come from secrets: masked in the replica's relayed output."""
    docker_image: str = ""
    """Registry reference of the docker image to run the replica in, as a container of the agent's docker runtime
    (the builder's docker backend's ``BuildResult.artifact``); empty: the process runtime."""


class StartReplicaReply(
    msgspec.Struct, frozen=True, kw_only=True, tag="duanflow.v1.agent.start_replica_reply", tag_field="type"
):
    """Agent → router: the replica is started and ready to pull."""

    replica_id: str
    """Replica id."""
    agent_id: str
    """Agent that runs it."""
    pid: int
    """Process id."""
    ready_ms: int = 0
    """Milliseconds from the command to readiness."""


class StopReplica(msgspec.Struct, frozen=True, kw_only=True, tag="duanflow.v1.agent.stop_replica", tag_field="type"):
    """Router → agent: drain and stop one replica."""

    replica_id: str
    """Replica id."""
    grace_s: float = 30.0
    """Seconds to drain in-flight inputs before SIGKILL."""


class FleetReply(msgspec.Struct, frozen=True, kw_only=True, tag="duanflow.v1.agent.fleet", tag_field="type"):
    """Router → anyone: the live agents, each with its latest capacity report."""

    agents: list[CapacityReport] = []
    """Latest report of every live agent, ordered by agent id."""

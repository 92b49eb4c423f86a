"""Settings of the host agent, from ``DUANFLOW_AGENT_*`` environment variables."""

from __future__ import annotations

import os

from duanflow_kit.settings import BaseSettings, load_settings

PREFIX = "DUANFLOW_AGENT_"


class Settings(BaseSettings, frozen=True, kw_only=True):
    """Typed settings of the agent."""

    agent_id: str = ""
    """Agent id (default: ``ag-<hostname>``)."""
    region: str = "local"
    """Region label reported to the router."""
    labels: dict[str, str] = {}
    """Free-form labels (JSON object)."""
    gpus: str = ""
    """Declared inventory such as ``H100:8`` or ``H100:2,L4:1``; marked simulated in every report."""
    simulate: bool = False
    """Without NVML, declare one GPU of each catalog type (marked simulated)."""
    prices: dict[str, float] = {}
    """$/GPU-hour per GPU type (JSON object)."""
    work_dir: str = "/tmp/duanflow-agent"
    """Where bundles and images are cached and replicas run."""
    report_interval_s: float = 2.0
    """Seconds between capacity reports."""
    replica_nats_user: str = ""
    """NATS user handed to replicas (default: the agent's own)."""
    replica_nats_password: str = ""
    """Password of ``replica_nats_user``."""
    python: str = ""
    """Python interpreter that runs replicas (default: the agent's own)."""
    runtime: str = "process"
    """Default runtime: ``process`` (child processes of the agent). Replicas whose start command names a docker
    image run as containers when ``docker_host`` is set."""
    runtime_module: str = "duanflow._runtime"
    """Module a replica process runs (``python -m <runtime_module>``); tests point it at a stand-in."""
    capacity_kv: bool = False
    """Also put each capacity report into the capacity KV bucket (needs a NATS user allowed to; the router
    normally does it from the reports on the capacity subject)."""
    start_timeout_s: float = 120.0
    """Seconds a replica has to announce readiness before it is killed and the start fails."""
    shutdown_grace_s: float = 10.0
    """Seconds replicas get to drain when the agent itself stops."""
    log_buffer_lines: int = 10000
    """Replica output lines buffered for NATS; beyond that lines are dropped and counted, never blocking."""
    exited_keep_s: float = 60.0
    """Seconds an exited replica is remembered (stop commands for it answer "already exited")."""
    image_cache_mb: int = 20480
    """Disk cap of the venv image cache under ``work_dir/images`` (least recently used images go first)."""
    docker_host: str = ""
    """Docker engine of the docker runtime (``unix:///run/docker.sock``); set: replicas whose start command names
    a docker image run as containers on the host network. Empty: only the process runtime."""
    docker_python: str = "python"
    """Interpreter inside replica containers (``<docker_python> -m <runtime_module>``)."""


def child_env() -> dict[str, str]:
    """The agent's environment as a base for replicas, without DuanFlow's own settings and credentials."""
    return {k: v for k, v in os.environ.items() if not k.startswith("DUANFLOW_")}


def load() -> Settings:
    """Settings from the environment."""
    return load_settings(Settings, PREFIX)

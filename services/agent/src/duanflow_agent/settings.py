"""Settings of the host agent, from ``DUANFLOW_AGENT_*`` environment variables."""

from __future__ import annotations

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
    """``process`` or ``docker``."""


def load() -> Settings:
    """Settings from the environment."""
    return load_settings(Settings, PREFIX)

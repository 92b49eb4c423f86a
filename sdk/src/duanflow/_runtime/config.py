"""The replica's configuration: the environment an agent starts it with (the only place it is read)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

REQUIRED = (
    "DUANFLOW_NATS_URL",
    "DUANFLOW_REPLICA_ID",
    "DUANFLOW_ENV",
    "DUANFLOW_APP",
    "DUANFLOW_FUNCTION",
    "DUANFLOW_MODULE",
    "DUANFLOW_STREAM",
    "DUANFLOW_CONSUMER",
)


class ConfigError(RuntimeError):
    """The replica was started without the environment it needs."""


@dataclass(frozen=True, slots=True)
class RuntimeConfig:
    """What one replica runs and where it connects."""

    nats_url: str
    nats_user: str
    nats_password: str
    replica_id: str
    env: str
    app: str
    release: str
    function: str
    module: str
    stream: str
    consumer: str
    concurrency: int = 1
    timeout_s: float = 300.0
    simulated_gpu: bool = False
    job_id: str = ""
    """Set for a job's dedicated replica (``DUANFLOW_JOB_ID``): run that one input, report it, exit."""

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> RuntimeConfig:
        """Read the ``DUANFLOW_*`` variables of CONTRACTS.md; missing or bad ones raise :class:`ConfigError`."""
        env = os.environ if environ is None else environ
        missing = [name for name in REQUIRED if not env.get(name)]
        if missing:
            raise ConfigError(f"missing environment: {', '.join(missing)} (replicas are started by a DuanFlow agent)")
        try:
            concurrency = int(env.get("DUANFLOW_CONCURRENCY", "1"))
            timeout_s = float(env.get("DUANFLOW_TIMEOUT_S", "300"))
        except ValueError as exc:
            raise ConfigError(f"bad DUANFLOW_CONCURRENCY or DUANFLOW_TIMEOUT_S: {exc}") from None
        if concurrency < 1:
            raise ConfigError(f"DUANFLOW_CONCURRENCY must be at least 1, not {concurrency}")
        return cls(
            nats_url=env["DUANFLOW_NATS_URL"],
            nats_user=env.get("DUANFLOW_NATS_USER", ""),
            nats_password=env.get("DUANFLOW_NATS_PASSWORD", ""),
            replica_id=env["DUANFLOW_REPLICA_ID"],
            env=env["DUANFLOW_ENV"],
            app=env["DUANFLOW_APP"],
            release=env.get("DUANFLOW_RELEASE", ""),
            function=env["DUANFLOW_FUNCTION"],
            module=env["DUANFLOW_MODULE"],
            stream=env["DUANFLOW_STREAM"],
            consumer=env["DUANFLOW_CONSUMER"],
            concurrency=concurrency,
            timeout_s=timeout_s,
            simulated_gpu=env.get("DUANFLOW_SIMULATED_GPU", "0").strip().lower() in ("1", "true", "yes"),
            job_id=env.get("DUANFLOW_JOB_ID", ""),
        )

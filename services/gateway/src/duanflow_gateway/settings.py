"""Settings of the gateway, from ``DUANFLOW_GATEWAY_*`` environment variables."""

from __future__ import annotations

from duanflow_kit.settings import BaseSettings, load_settings

PREFIX = "DUANFLOW_GATEWAY_"


class Settings(BaseSettings, frozen=True, kw_only=True):
    """Typed settings of the HTTP gateway."""

    env: str = "main"
    """The one environment whose endpoints this gateway serves; route entries of other envs are not loaded."""
    http_host: str = "127.0.0.1"
    """Address the HTTP server binds to."""
    http_port: int = 8080
    """HTTP port (0: pick a free one)."""
    max_body_bytes: int = 10 * 1024 * 1024
    """Largest request body accepted (413 above)."""
    default_timeout_s: float = 300.0
    """Deadline of a request whose endpoint sets none."""
    shutdown_grace_s: float = 10.0
    """How long in-flight HTTP requests may finish after SIGTERM."""


def load() -> Settings:
    """Settings from the environment."""
    return load_settings(Settings, PREFIX)

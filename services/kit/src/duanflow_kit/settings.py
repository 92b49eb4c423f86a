"""Typed settings read from ``DUANFLOW_<SVC>_<FIELD>`` environment variables.

Every service declares one ``msgspec.Struct`` subclass of :class:`BaseSettings`; the shared NATS
connection fields may also come from the un-prefixed ``DUANFLOW_NATS_*`` variables.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, TypeVar

import msgspec

S = TypeVar("S", bound="BaseSettings")

SHARED_FIELDS = ("nats_url", "nats_user", "nats_password")


class BaseSettings(msgspec.Struct, kw_only=True, frozen=True):
    """Settings every service has."""

    nats_url: str = "nats://127.0.0.1:4222"
    """NATS server URL(s), comma separated."""
    nats_user: str = ""
    """NATS user name (role: service or agent)."""
    nats_password: str = ""
    """NATS password."""
    instance: str = ""
    """Instance id (default: generated)."""
    log_level: str = "info"
    """Python log level."""
    metrics_port: int = 0
    """Serve this process's metrics in Prometheus' text format on this HTTP port (0: not served)."""


def env_names(cls: type[BaseSettings], prefix: str) -> dict[str, str]:
    """Map every env var that configures ``cls`` to its field name."""
    names: dict[str, str] = {}
    for field in msgspec.structs.fields(cls):
        names[f"{prefix}{field.name.upper()}"] = field.name
        if field.name in SHARED_FIELDS:
            names[f"DUANFLOW_{field.name.upper()}"] = field.name
    return names


def required_fields(cls: type[BaseSettings]) -> list[str]:
    """Fields without a default."""
    return [
        f.name
        for f in msgspec.structs.fields(cls)
        if f.default is msgspec.NODEFAULT and f.default_factory is msgspec.NODEFAULT
    ]


def load_settings(cls: type[S], prefix: str, environ: Mapping[str, str] | None = None) -> S:
    """Build ``cls`` from the environment (prefixed names win over shared ones).

    >>> class S(BaseSettings, frozen=True, kw_only=True):
    ...     port: int = 1
    >>> load_settings(S, "DUANFLOW_X_", {"DUANFLOW_X_PORT": "8"}).port
    8
    """
    env = os.environ if environ is None else environ
    raw: dict[str, Any] = {}
    for name, field in env_names(cls, prefix).items():
        if name in env and (field not in raw or name.startswith(prefix)):
            value: Any = env[name]
            ftype = next(f.type for f in msgspec.structs.fields(cls) if f.name == field)
            if _is_collection(ftype):
                try:
                    value = msgspec.json.decode(value) if value.strip().startswith(("[", "{")) else value.split(",")
                except msgspec.DecodeError as exc:
                    raise SystemExit(f"invalid settings for {cls.__name__}: {name} is not valid JSON ({exc})") from None
            raw[field] = value
    try:
        return msgspec.convert(raw, cls, strict=False)
    except msgspec.ValidationError as exc:
        raise SystemExit(f"invalid settings for {cls.__name__} ({prefix}*): {exc}") from None


def _is_collection(tp: Any) -> bool:
    origin = getattr(tp, "__origin__", tp)
    return origin in (list, dict, tuple, set)


OTLP_ENDPOINT_VAR = "OTEL_EXPORTER_OTLP_ENDPOINT"


def otlp_endpoint(environ: Mapping[str, str] | None = None) -> str:
    """The standard OpenTelemetry exporter endpoint (empty: exporting off, the default).

    >>> otlp_endpoint({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"})
    'http://collector:4318'
    """
    env = os.environ if environ is None else environ
    return env.get(OTLP_ENDPOINT_VAR, "")

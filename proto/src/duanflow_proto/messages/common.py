"""Messages shared by every service: errors, health, plain acks."""

from __future__ import annotations

import msgspec


class ErrorReply(msgspec.Struct, frozen=True, kw_only=True, tag="duanflow.v1.common.error", tag_field="type"):
    """A typed error crossing the wire; turned back into its class by ``duanflow_proto.errors.from_reply``."""

    code: str
    """Machine-readable error code (``not_found``, ``invalid_input``, ...)."""
    message: str
    """Human-readable message that says what to do."""
    retryable: bool = False
    """Whether retrying the same request can succeed."""
    http_status: int = 500
    """HTTP status the gateway answers with."""
    details: dict[str, str] = {}
    """Structured fields (the option, the valid values, ...)."""
    traceback: str | None = None
    """Remote traceback, for errors raised by user code."""
    exc_type: str | None = None
    """``module.QualName`` of the user's exception, re-raised locally when importable."""
    exc_pickle: bytes | None = None
    """The user's exception, cloudpickled (never read by the gateway)."""


class HealthRequest(
    msgspec.Struct, frozen=True, kw_only=True, tag="duanflow.v1.common.health_request", tag_field="type"
):
    """Ask a service whether it is healthy."""

    verbose: bool = False
    """Include details such as dependencies' state."""


class HealthReply(msgspec.Struct, frozen=True, kw_only=True, tag="duanflow.v1.common.health", tag_field="type"):
    """A service's answer to a health request."""

    service: str
    """Service name (``router``, ``builder``, ...)."""
    instance: str
    """Instance id of the answering process."""
    ok: bool
    """Whether the instance is healthy."""
    pid: int = 0
    """Process id on its host."""
    version: str = "0.1.0"
    """Software version."""
    details: dict[str, str] = {}
    """Extra facts (dependency state, simulated inventory, ...)."""


class Ack(msgspec.Struct, frozen=True, kw_only=True, tag="duanflow.v1.common.ack", tag_field="type"):
    """A plain positive answer."""

    message: str = "ok"
    """Short human-readable note."""

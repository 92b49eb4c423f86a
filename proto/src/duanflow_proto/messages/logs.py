"""Log lines."""

from __future__ import annotations

import msgspec

KINDS = ("build", "runtime", "request", "scheduler")


class LogLine(msgspec.Struct, frozen=True, kw_only=True, tag="duanflow.v1.logs.line", tag_field="type"):
    """One log line on the logs stream."""

    ts_ms: int
    """When it was written (epoch ms)."""
    env: str
    """Environment."""
    app: str
    """App name."""
    kind: str
    """``build``, ``runtime``, ``request`` or ``scheduler``."""
    source: str
    """Who wrote it (replica id, service name, image id)."""
    message: str
    """The text (never secrets, tokens or bodies)."""
    level: str = "info"
    """``debug``, ``info``, ``warning``, ``error``."""
    stream: str = ""
    """``stdout`` / ``stderr`` for replica output."""
    release: str = ""
    """Release id."""
    function: str = ""
    """Function name."""
    replica: str = ""
    """Replica id."""
    invocation: str = ""
    """Call id."""

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


class LogQuery(msgspec.Struct, frozen=True, kw_only=True, tag="duanflow.v1.logs.query", tag_field="type"):
    """Ask the log service for archived lines of one app in a time range."""

    env: str = "main"
    """Environment."""
    app: str
    """App name."""
    kind: str | None = None
    """Only lines of this kind (``build``, ``runtime``, ``request``, ``scheduler``); None: every kind."""
    since_ms: int = 0
    """Earliest ``ts_ms`` included (epoch ms)."""
    until_ms: int = 0
    """Latest ``ts_ms`` included (epoch ms; 0: no upper bound)."""
    function: str | None = None
    """Only lines of this function."""
    search: str | None = None
    """Only lines whose message contains this text (case-insensitive)."""
    limit: int = 1000
    """Most lines returned (the oldest matching ones first)."""


class LogQueryReply(msgspec.Struct, frozen=True, kw_only=True, tag="duanflow.v1.logs.query_reply", tag_field="type"):
    """Archived lines matching a :class:`LogQuery`, oldest first."""

    lines: list[LogLine] = []
    """The lines, in time order."""
    truncated: bool = False
    """True when more lines matched than ``limit``: ask again from the last line's ``ts_ms``."""

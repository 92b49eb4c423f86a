"""Log lines."""

from __future__ import annotations

import struct

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
    seq: int = 0
    """Sequence of the line on the logs stream: set in the log service's answers (0 when publishing)."""


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
    before_seq: int = 0
    """Only lines whose stream sequence is below this (the ones no longer on the stream); 0: no bound."""


class LogQueryReply(msgspec.Struct, frozen=True, kw_only=True, tag="duanflow.v1.logs.query_reply", tag_field="type"):
    """Archived lines matching a :class:`LogQuery`, oldest first."""

    lines: list[LogLine] = []
    """The lines, in time order."""
    truncated: bool = False
    """True when more lines matched than ``limit``: ask again from the last line's ``ts_ms``."""


def decode_line_lenient(data: bytes) -> LogLine | None:
    """A :class:`LogLine` from msgpack ``data`` whose strings may hold bytes that are not UTF-8 (kept as
    backslash escapes); None when ``data`` is no log line even then. For lines that strict decoding refused."""
    try:
        fields, _ = _unpack(memoryview(data), 0)
    except (IndexError, ValueError, TypeError, UnicodeDecodeError):
        return None
    if not isinstance(fields, dict) or fields.pop("type", None) != LogLine.__struct_config__.tag:
        return None
    try:
        return msgspec.convert(fields, LogLine)
    except msgspec.ValidationError:
        return None


_FIXED = {0xC0: None, 0xC2: False, 0xC3: True}
_SIZES = {0xCC: ">B", 0xCD: ">H", 0xCE: ">I", 0xCF: ">Q", 0xD0: ">b", 0xD1: ">h", 0xD2: ">i", 0xD3: ">q"}
_STR = {0xD9: ">B", 0xDA: ">H", 0xDB: ">I"}
_MAP = {0xDE: ">H", 0xDF: ">I"}


def _unpack(buf: memoryview, pos: int) -> tuple[object, int]:
    """One msgpack value of a flat map (nil, bools, ints, strings, maps) starting at ``pos``."""
    b = buf[pos]
    pos += 1
    if b <= 0x7F:
        return b, pos
    if b >= 0xE0:
        return b - 0x100, pos
    if b in _FIXED:
        return _FIXED[b], pos
    if 0xA0 <= b <= 0xBF or b in _STR:
        if b in _STR:
            size = struct.calcsize(_STR[b])
            (n,) = struct.unpack_from(_STR[b], buf, pos)
            pos += size
        else:
            n = b & 0x1F
        return bytes(buf[pos : pos + n]).decode(errors="backslashreplace"), pos + n
    if b in _SIZES:
        (v,) = struct.unpack_from(_SIZES[b], buf, pos)
        return v, pos + struct.calcsize(_SIZES[b])
    if 0x80 <= b <= 0x8F or b in _MAP:
        if b in _MAP:
            (n,) = struct.unpack_from(_MAP[b], buf, pos)
            pos += struct.calcsize(_MAP[b])
        else:
            n = b & 0x0F
        out: dict[object, object] = {}
        for _ in range(n):
            key, pos = _unpack(buf, pos)
            out[key], pos = _unpack(buf, pos)
        return out, pos
    raise ValueError(f"unsupported msgpack type 0x{b:02x}")


LEVEL_MARK = "\x02df-level:"
"""Starts a replica's output line written by Python ``logging``: ``LEVEL_MARK + level + TAB + text``; the agent's
log relay takes the level from it (``debug``, ``info``, ``warning``, ``error``) and strips it."""
LEVELS = ("debug", "info", "warning", "error")

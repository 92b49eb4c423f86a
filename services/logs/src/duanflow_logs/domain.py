"""The log service's rules over plain data: which stream messages are log lines, how a query becomes one SQL
statement, and how many lines fit one reply. Pure: no transport imports."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from duanflow_proto import codec, subjects
from duanflow_proto.errors import DuanFlowError, InvalidInputError
from duanflow_proto.messages.logs import KINDS, LogLine, LogQuery, LogQueryReply

LINE_FIELDS = (
    "ts_ms",
    "env",
    "app",
    "kind",
    "source",
    "level",
    "stream",
    "release",
    "function",
    "replica",
    "invocation",
    "message",
)
"""Columns of table ``lines`` that hold a :class:`LogLine`'s fields, in that order."""
COLUMNS = ("seq", *LINE_FIELDS)
"""Every column an insert writes: the stream sequence, then the line."""

Row = tuple[Any, ...]

# A reply must fit one NATS message (1 MiB by default) with room for headers and the envelope.
DEFAULT_MAX_REPLY_BYTES = 900_000
_PER_LINE_OVERHEAD = 8


@dataclass(frozen=True)
class Batch:
    """One batch taken from the stream, split into rows to store and positions of malformed messages."""

    rows: list[Row]
    """Rows to insert, in the order of the messages they come from."""
    stored: list[int]
    """Position in the batch of each row's message."""
    malformed: list[int]
    """Positions of messages that are not log lines (terminated, never retried)."""
    errors: list[str]
    """Why each malformed message was refused."""


def row_of(seq: int, line: LogLine) -> Row:
    """The row storing ``line``, taken from stream sequence ``seq``."""
    return (seq, *(getattr(line, f) for f in LINE_FIELDS))


def line_of(record: Mapping[str, Any]) -> LogLine:
    """A stored row back as a :class:`LogLine`."""
    return LogLine(**{f: record[f] for f in LINE_FIELDS})


def split_batch(messages: Sequence[tuple[int, bytes]]) -> Batch:
    """Decode ``(stream sequence, data)`` pairs; garbage is set aside, never raised."""
    rows: list[Row] = []
    stored: list[int] = []
    malformed: list[int] = []
    errors: list[str] = []
    for i, (seq, data) in enumerate(messages):
        try:
            line = codec.decode(data, LogLine)
        except DuanFlowError as exc:
            malformed.append(i)
            errors.append(exc.message)
            continue
        rows.append(row_of(seq, line))
        stored.append(i)
    return Batch(rows=rows, stored=stored, malformed=malformed, errors=errors)


@dataclass(frozen=True)
class QueryPlan:
    """One SQL statement answering a :class:`LogQuery` (``limit + 1`` rows, to tell whether more matched)."""

    sql: str
    params: tuple[Any, ...]
    limit: int


def plan_query(query: LogQuery, max_lines: int) -> QueryPlan:
    """Validate ``query`` and build its SELECT over table ``lines``, oldest first.

    Raises :class:`InvalidInputError` naming the bad field.

    >>> plan_query(LogQuery(app="demo", kind="build", limit=5), 100).sql.split(" WHERE ")[1]
    'env = $1 AND app = $2 AND kind = $3 ORDER BY ts_ms, seq LIMIT $4'
    """
    for name in ("env", "app"):
        try:
            subjects.token(getattr(query, name))
        except ValueError as exc:
            raise InvalidInputError(str(exc), details={"field": name}) from None
    if query.kind is not None and query.kind not in KINDS:
        raise InvalidInputError(
            f"unknown log kind {query.kind!r}: use one of {', '.join(KINDS)}",
            details={"field": "kind", "valid": ",".join(KINDS)},
        )
    if not 1 <= query.limit <= max_lines:
        raise InvalidInputError(
            f"limit {query.limit} is out of range: ask for 1 to {max_lines} lines", details={"field": "limit"}
        )
    if query.since_ms < 0 or query.until_ms < 0:
        raise InvalidInputError(
            "since_ms and until_ms are epoch milliseconds (0 or more)", details={"field": "since_ms"}
        )
    if query.until_ms and query.until_ms < query.since_ms:
        raise InvalidInputError("until_ms is before since_ms", details={"field": "until_ms"})

    where = ["env = $1", "app = $2"]
    params: list[Any] = [query.env, query.app]

    def add(condition: str, value: Any) -> None:
        params.append(value)
        where.append(condition.format(f"${len(params)}"))

    if query.kind is not None:
        add("kind = {}", query.kind)
    if query.since_ms:
        add("ts_ms >= {}", query.since_ms)
    if query.until_ms:
        add("ts_ms <= {}", query.until_ms)
    if query.function:
        add("function = {}", query.function)
    if query.search:
        add("strpos(lower(message), lower({})) > 0", query.search)
    params.append(query.limit + 1)
    # Only constant column names, conditions and placeholders are interpolated; values travel as parameters.
    sql = (
        f"SELECT {', '.join(COLUMNS)} FROM lines WHERE {' AND '.join(where)} "  # noqa: S608
        f"ORDER BY ts_ms, seq LIMIT ${len(params)}"
    )
    return QueryPlan(sql=sql, params=tuple(params), limit=query.limit)


def reply_of(lines: Sequence[LogLine], limit: int, max_bytes: int = DEFAULT_MAX_REPLY_BYTES) -> LogQueryReply:
    """The reply for the lines a plan found: at most ``limit`` lines and ``max_bytes``, ``truncated`` when cut."""
    kept: list[LogLine] = []
    size = 0
    for line in lines[:limit]:
        size += len(codec.encode(line)) + _PER_LINE_OVERHEAD
        if size > max_bytes and kept:
            break
        kept.append(line)
    return LogQueryReply(lines=kept, truncated=len(kept) < len(lines))

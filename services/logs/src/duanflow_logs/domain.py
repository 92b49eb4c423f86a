"""The log service's rules over plain data: which stream messages are log lines, how a query becomes one SQL
statement, and how many lines fit one reply. Pure: no transport imports."""

from __future__ import annotations

import contextlib
import gzip
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import msgspec
from duanflow_proto import codec, subjects
from duanflow_proto.errors import DuanFlowError, InvalidInputError
from duanflow_proto.messages.logs import KINDS, LogLine, LogQuery, LogQueryReply, decode_line_lenient

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
    """A stored row back as a :class:`LogLine` (with its stream sequence)."""
    return LogLine(seq=record["seq"], **{f: record[f] for f in LINE_FIELDS})


def decode_line(data: bytes) -> LogLine:
    """A log line from stream data; strings that are not UTF-8 are kept as backslash escapes, never refused.

    Raises :class:`InvalidInputError` when ``data`` is no log line at all.
    """
    try:
        return codec.decode(data, LogLine)
    except (DuanFlowError, UnicodeDecodeError) as exc:
        line = decode_line_lenient(data)
        if line is None:
            if isinstance(exc, DuanFlowError):
                raise
            raise InvalidInputError(f"malformed message, expected LogLine: {exc}") from None
        return line


def split_batch(messages: Sequence[tuple[int, bytes]]) -> Batch:
    """Decode ``(stream sequence, data)`` pairs; garbage is set aside, never raised."""
    rows: list[Row] = []
    stored: list[int] = []
    malformed: list[int] = []
    errors: list[str] = []
    for i, (seq, data) in enumerate(messages):
        try:
            line = decode_line(data)
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
    if query.before_seq < 0:
        raise InvalidInputError("before_seq is a stream sequence (0 or more)", details={"field": "before_seq"})

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
    if query.before_seq:
        add("seq < {}", query.before_seq)
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


# --- archive: what ages out of Postgres goes to S3, one gzip JSON-lines object per app and hour -----------------

HOUR_MS = 3_600_000


@dataclass(frozen=True)
class ArchiveRef:
    """One archived object (a row of table ``archives``)."""

    env: str
    app: str
    hour_ms: int
    """Start of the hour its lines were written in (epoch ms)."""
    key: str
    lines: int
    min_seq: int
    max_seq: int


def hour_of(ts_ms: int) -> int:
    """Start of the hour ``ts_ms`` falls in.

    >>> hour_of(7_200_000 + 59_999)
    7200000
    """
    return ts_ms - ts_ms % HOUR_MS


def archive_key(env: str, app: str, hour_ms: int, min_seq: int, max_seq: int) -> str:
    """Object key of one archive: by env, app and hour (lines of one hour written later get their own object).

    >>> archive_key("main", "demo", 1_700_002_800_000, 5, 9)
    'logs/main/demo/2023/11/14/23h-5-9.jsonl.gz'
    """
    when = datetime.fromtimestamp(hour_ms / 1000, UTC)
    return f"logs/{env}/{app}/{when:%Y/%m/%d/%H}h-{min_seq}-{max_seq}.jsonl.gz"


def encode_archive(lines: Sequence[LogLine]) -> bytes:
    """Lines (with their sequences) as gzip-compressed JSON lines."""
    enc = msgspec.json.Encoder()
    return gzip.compress(b"".join(enc.encode(ln) + b"\n" for ln in lines), compresslevel=6)


def decode_archive(data: bytes) -> list[LogLine]:
    """The lines of one archive object (lines that do not decode are skipped, never raised)."""
    dec = msgspec.json.Decoder(LogLine)
    out: list[LogLine] = []
    for raw in gzip.decompress(data).splitlines():
        with contextlib.suppress(msgspec.DecodeError, msgspec.ValidationError):
            out.append(dec.decode(raw))
    return out


def matches(query: LogQuery, line: LogLine) -> bool:
    """Whether ``line`` answers ``query`` (the same rules as the SQL of :func:`plan_query`)."""
    return (
        line.env == query.env
        and line.app == query.app
        and (query.kind is None or line.kind == query.kind)
        and line.ts_ms >= query.since_ms
        and (not query.until_ms or line.ts_ms <= query.until_ms)
        and (not query.function or line.function == query.function)
        and (not query.search or query.search.lower() in line.message.lower())
        and (not query.before_seq or line.seq < query.before_seq)
    )


def archives_needed(query: LogQuery, refs: Sequence[ArchiveRef]) -> list[ArchiveRef]:
    """The archives that may hold lines of ``query``, oldest hour first."""
    return sorted(
        (
            r
            for r in refs
            if r.hour_ms + HOUR_MS > query.since_ms
            and (not query.until_ms or r.hour_ms <= query.until_ms)
            and (not query.before_seq or r.min_seq < query.before_seq)
        ),
        key=lambda r: (r.hour_ms, r.min_seq),
    )


def merge(*sources: Sequence[LogLine], limit: int) -> list[LogLine]:
    """One timeline from several sources: by time then stream sequence, each line once, ``limit + 1`` at most
    (the extra line tells the reply it was truncated)."""
    seen: set[tuple[int, int]] = set()
    out: list[LogLine] = []
    for ln in sorted((ln for src in sources for ln in src), key=lambda ln: (ln.ts_ms, ln.seq)):
        if (ln.seq, ln.ts_ms) in seen:
            continue
        seen.add((ln.seq, ln.ts_ms))
        out.append(ln)
        if len(out) > limit:
            break
    return out

"""``duanflow logs APP [--follow] [--kind KIND] [--since 30m] [--until T] [--function F] [--search S]``.

Build output, replica stdout/stderr, request logs and scheduler decisions all travel on
``subjects.logs(env, app, kind, source)``; this reads them with an ordered JetStream consumer (nothing
durable is left behind), from ``--since`` or from the start of what the stream retains. Lines older than
the stream come from the log service (``API_LOG_QUERY``), shown first; duplicates are dropped by stream sequence.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
from duanflow_proto import codec, subjects
from duanflow_proto.errors import DuanFlowError, UnavailableError
from duanflow_proto.messages.logs import KINDS, LogLine, LogQuery, LogQueryReply, decode_line_lenient
from duanflow_proto.messages.release import ReleaseList, ReleaseListRequest
from nats.js.api import ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError
from rich.markup import escape

from duanflow._cli.output import CliError, err, out
from duanflow._client import Client

IDLE_S = 1.5
"""Without ``--follow``: stop once no line arrived for this long (or the stream says nothing is pending)."""
SETUP_S = 10.0

_SINCE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d)\s*$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_LEVEL_STYLE = {"error": "red", "warning": "yellow", "debug": "dim"}


def parse_since(text: str, *, now: datetime | None = None, option: str = "--since") -> datetime:
    """``30m``, ``2h``, ``1d``, ``45s`` ago, or an ISO time (``2026-05-05T18:42``), as an aware UTC datetime."""
    now = now or datetime.now(UTC)
    match = _SINCE.match(text)
    if match:
        return now - timedelta(seconds=float(match.group(1)) * _UNITS[match.group(2)])
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        raise CliError(f"{option} {text!r}: give a duration like 30m, 2h, 1d or a time like 2026-05-05T18:42") from None
    return when if when.tzinfo else when.astimezone(UTC)


def check_kind(kind: str | None) -> None:
    """Refuse a kind the platform does not write."""
    if kind is not None and kind not in KINDS:
        raise CliError(f"--kind {kind!r} is not a log kind: use one of {', '.join(KINDS)}")


def format_line(line: LogLine) -> str:
    """``18:42:07 [scheduler] router  message`` with rich markup (level colours)."""
    ts = datetime.fromtimestamp(line.ts_ms / 1000).strftime("%Y-%m-%d %H:%M:%S")
    where = line.replica or line.source
    text = escape(line.message)
    style = _LEVEL_STYLE.get(line.level)
    if style:
        text = f"[{style}]{text}[/{style}]"
    return f"[dim]{ts}[/dim] [cyan]\\[{line.kind}][/cyan] [bold]{escape(where)}[/bold] {text}"


@dataclass(frozen=True)
class LineFilter:
    """What ``--function``, ``--search`` and ``--until`` keep (applied to stream lines; the log service applies
    the same rules to history)."""

    function: str | None = None
    search: str | None = None
    until_ms: int = 0

    def keeps(self, line: LogLine) -> bool:
        """Whether ``line`` is shown."""
        if self.function and line.function != self.function:
            return False
        if self.until_ms and line.ts_ms > self.until_ms:
            return False
        return not self.search or self.search.lower() in line.message.lower()


def decode_stream_line(subject: str, data: bytes, ts_ms: int) -> LogLine:
    """A stream message as a line: text that is not UTF-8 is escaped, and data that is no log line at all is
    shown as an escaped ``warning`` from its subject's kind and source rather than dropped silently."""
    with contextlib.suppress(DuanFlowError, UnicodeDecodeError):
        return codec.decode(data, LogLine)
    lenient = decode_line_lenient(data)
    if lenient is not None:
        return lenient
    text = data.decode(errors="backslashreplace")
    parts = subject.split(".")
    kind, source = (parts[-2], parts[-1]) if len(parts) >= 4 else ("runtime", "unknown")
    app = parts[-3] if len(parts) >= 4 else ""
    env = parts[-4] if len(parts) >= 4 else ""
    return LogLine(
        ts_ms=ts_ms, env=env, app=app, kind=kind, source=source, level="warning", message=f"[not a log line] {text}"
    )


async def check_app(client: Client, env: str, app: str) -> None:
    """Refuse an app with no release in ``env`` (naming the ones that exist); skipped when no router answers."""
    try:
        found = await client.request(subjects.API_RELEASES, ReleaseListRequest(app="", env=env), ReleaseList)
    except UnavailableError:
        return  # no router answers: the logs are still worth reading (often why they are read)
    except DuanFlowError as exc:
        raise CliError(f"cannot list the apps of env {env!r}: {exc}") from None
    known = sorted({r.app for r in found.releases})
    if app not in known:
        raise CliError(
            f"unknown app {app!r} in env {env!r}",
            hint=f"apps in {env}: {', '.join(known)}" if known else f"no app is deployed in {env}",
        )


async def _history(
    client: Client, query: LogQuery, show: Callable[[LogLine], None], keep: LineFilter, shown: set[int]
) -> int:
    """Lines the log service holds that the stream no longer has, page by page; returns how many were shown."""
    count = 0
    while True:
        try:
            reply = await client.request(subjects.API_LOG_QUERY, query, LogQueryReply)
        except DuanFlowError as exc:
            err.print(f"[yellow]older lines unavailable ({exc}); showing what the stream holds[/yellow]")
            return count
        fresh = [ln for ln in reply.lines if ln.seq not in shown]
        for ln in fresh:
            shown.add(ln.seq)
            if keep.keeps(ln):
                show(ln)
                count += 1
        if not reply.truncated or not fresh:
            return count
        query = msgspec.structs.replace(query, since_ms=reply.lines[-1].ts_ms)


def ack_fields(reply: str) -> tuple[int, int, int]:
    """(stream sequence, stream time in epoch ms, messages pending) from a JetStream message's reply subject
    (``$JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ns>.<pending>``, or with domain and account hash
    after ``ACK``): what ``msg.metadata`` gives, at a fraction of its cost per line.

    >>> ack_fields("$JS.ACK.S.C.1.42.7.1700000000123456789.3")
    (42, 1700000000123, 3)
    """
    t = reply.split(".")
    base = 2 if len(t) == 9 else 4
    return int(t[base + 3]), int(t[base + 5]) // 1_000_000, int(t[base + 6])


async def _first_on_stream(js: Any, subject: str) -> int:
    """Sequence of the oldest message on ``subject`` the stream still holds (the last sequence + 1 when none):
    every older line of the app has aged out and only the log service has it."""
    try:
        msg = await js.get_msg(subjects.STREAM_LOGS, seq=1, subject=subject, next=True)
    except NotFoundError:
        info = await js.stream_info(subjects.STREAM_LOGS)
        return int(info.state.last_seq) + 1
    return int(msg.seq)


async def read_logs(
    client: Client,
    *,
    env: str,
    app: str,
    kind: str | None,
    since: datetime | None,
    follow: bool,
    show: Callable[[LogLine], None],
    until: datetime | None = None,
    function: str | None = None,
    search: str | None = None,
    check: bool = True,
) -> int:
    """Print the app's lines through ``show`` as one timeline: with ``since``, first what has aged out of the
    stream (from the log service), then the stream; with ``follow``, keep going until cancelled.

    The stream consumer starts before the history is read and buffers; lines the two share are shown once
    (by stream sequence). Returns the count shown.
    """
    if check:
        await check_app(client, env, app)
    nc = await client.connect()
    js = nc.jetstream()
    keep = LineFilter(function, search, int(until.timestamp() * 1000) if until else 0)
    pending: list[Any] = []
    arrived = asyncio.Event()
    caught_up = asyncio.Event()
    loop = asyncio.get_running_loop()
    last = loop.time()

    async def on_msg(msg: Any) -> None:
        nonlocal last
        last = loop.time()
        pending.append(msg)  # decoded in batches by the loop below: the callback stays cheap
        arrived.set()

    config = (
        ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_TIME, opt_start_time=since)
        if since is not None
        else ConsumerConfig(deliver_policy=DeliverPolicy.ALL)
    )
    try:
        sub = await asyncio.wait_for(
            js.subscribe(
                subjects.logs_filter(env, app, kind),
                stream=subjects.STREAM_LOGS,
                ordered_consumer=True,
                config=config,
                cb=on_msg,
            ),
            SETUP_S,
        )
        first_seq = await _first_on_stream(js, subjects.logs_filter(env, app, kind)) if since is not None else 0
    except Exception as exc:
        raise CliError(f"cannot read the logs stream: {type(exc).__name__}: {exc}") from None
    shown: set[int] = set()
    seen = 0
    try:
        if since is not None:
            query = LogQuery(
                env=env,
                app=app,
                kind=kind,
                since_ms=int(since.timestamp() * 1000),
                until_ms=keep.until_ms,
                function=function,
                search=search,
                before_seq=first_seq,
            )
            seen += await _history(client, query, show, keep, shown)
        while True:
            if not pending:
                if not follow and (caught_up.is_set() or loop.time() - last > IDLE_S):
                    break
                arrived.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(arrived.wait(), None if follow else 0.2)
                continue
            batch = pending[:]
            pending.clear()
            for msg in batch:
                seq, ts_ms, left = ack_fields(msg.reply)
                if left == 0:
                    caught_up.set()
                if seq in shown:
                    continue
                line = decode_stream_line(msg.subject, msg.data, ts_ms)
                if keep.keeps(line):
                    show(line)
                    seen += 1
            with contextlib.suppress(Exception):
                out.file.flush()
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()
    return seen


def show_line(*, json_out: bool) -> Callable[[LogLine], None]:
    """How one line is printed: rich text, or one JSON object per line."""
    if json_out:
        encode = msgspec.json.Encoder().encode

        def show_json(line: LogLine) -> None:
            out.file.write(encode(line).decode() + "\n")  # flushed by read_logs after each batch

        return show_json
    return lambda line: out.print(format_line(line))

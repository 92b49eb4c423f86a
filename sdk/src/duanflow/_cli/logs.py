"""``duanflow logs APP [--follow] [--kind KIND] [--since 30m]``: an app's log lines from the logs stream.

Build output, replica stdout/stderr, request logs and scheduler decisions all travel on
``subjects.logs(env, app, kind, source)``; this reads them with an ordered JetStream consumer (nothing
durable is left behind), from ``--since`` or from the start of what the stream retains.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
from duanflow_proto import codec, subjects
from duanflow_proto.messages.logs import KINDS, LogLine
from nats.js.api import ConsumerConfig, DeliverPolicy
from rich.markup import escape

from duanflow._cli.output import CliError, out
from duanflow._client import Client

IDLE_S = 1.5
"""Without ``--follow``: stop once no line arrived for this long (or the stream says nothing is pending)."""
SETUP_S = 10.0

_SINCE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d)\s*$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_LEVEL_STYLE = {"error": "red", "warning": "yellow", "debug": "dim"}


def parse_since(text: str, *, now: datetime | None = None) -> datetime:
    """``30m``, ``2h``, ``1d``, ``45s`` ago, or an ISO time (``2026-05-05T18:42``), as an aware UTC datetime."""
    now = now or datetime.now(UTC)
    match = _SINCE.match(text)
    if match:
        return now - timedelta(seconds=float(match.group(1)) * _UNITS[match.group(2)])
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        raise CliError(f"--since {text!r}: give a duration like 30m, 2h, 1d or a time like 2026-05-05T18:42") from None
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


async def read_logs(
    client: Client,
    *,
    env: str,
    app: str,
    kind: str | None,
    since: datetime | None,
    follow: bool,
    show: Callable[[LogLine], None],
) -> int:
    """Print the app's lines through ``show``; with ``follow``, keep going until cancelled. Returns the count."""
    nc = await client.connect()
    js = nc.jetstream()
    seen = 0
    caught_up = asyncio.Event()
    last = asyncio.get_running_loop().time()

    async def on_msg(msg: Any) -> None:
        nonlocal seen, last
        last = asyncio.get_running_loop().time()
        with contextlib.suppress(msgspec.DecodeError, msgspec.ValidationError, Exception):
            show(codec.decode(msg.data, LogLine))
            seen += 1
        with contextlib.suppress(Exception):
            if msg.metadata.num_pending == 0:
                caught_up.set()

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
    except Exception as exc:
        raise CliError(f"cannot read the logs stream: {type(exc).__name__}: {exc}") from None
    try:
        if follow:
            await asyncio.Event().wait()  # until Ctrl-C
        while not caught_up.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(caught_up.wait(), 0.2)
            if asyncio.get_running_loop().time() - last > IDLE_S:
                break
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()
    return seen


def show_line(*, json_out: bool) -> Callable[[LogLine], None]:
    """How one line is printed: rich text, or one JSON object per line."""
    if json_out:
        return lambda line: out.print(msgspec.json.encode(line).decode(), markup=False, highlight=False)
    return lambda line: out.print(format_line(line))

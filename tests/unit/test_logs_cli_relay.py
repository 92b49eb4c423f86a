"""``duanflow logs`` helpers (filters, lenient decoding, unknown apps), the log service's lenient decoding and
``before_seq``, and the agent's log relay rate limit."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

import pytest
from duanflow._cli.logs import LineFilter, check_app, decode_stream_line, parse_since
from duanflow._cli.output import CliError
from duanflow_agent.adapters.nats import LogRelay
from duanflow_logs.domain import decode_line, plan_query, split_batch
from duanflow_proto import codec, subjects
from duanflow_proto.errors import InvalidInputError
from duanflow_proto.messages.agent import StartReplica
from duanflow_proto.messages.logs import LogLine, LogQuery, decode_line_lenient
from duanflow_proto.messages.release import AppSpec, Release, ReleaseList

SUBJECT = subjects.logs("main", "demo", "runtime", "rp-1")


def lc_line(message: str = "hello", **kw: Any) -> LogLine:
    fields = {"env": "main", "app": "demo", "kind": "runtime", "source": "rp-1", **kw}
    return LogLine(ts_ms=1000, message=message, **fields)


def test_filter_keeps_function_search_and_until() -> None:
    keep = LineFilter(function="f", search="BOOM", until_ms=2000)
    assert keep.keeps(lc_line("a boom here", function="f"))
    assert not keep.keeps(lc_line("a boom here", function="g"))
    assert not keep.keeps(lc_line("quiet", function="f"))
    assert not keep.keeps(
        LogLine(ts_ms=2001, env="e", app="a", kind="runtime", source="s", message="boom", function="f")
    )
    assert LineFilter().keeps(lc_line())


def test_until_and_since_errors_name_their_option() -> None:
    with pytest.raises(CliError, match="--until 'soon'"):
        parse_since("soon", option="--until")
    with pytest.raises(CliError, match="--since '30 minutes'"):
        parse_since("30 minutes")
    assert parse_since("7d", now=datetime(2026, 1, 8, tzinfo=UTC)) == datetime(2026, 1, 1, tzinfo=UTC)


def test_non_utf8_is_escaped_never_refused() -> None:
    raw = codec.encode(lc_line("x" * 40 + "QQ")).replace(b"QQ", b"\xff\xfe")
    with pytest.raises(UnicodeDecodeError):
        codec.decode(raw, LogLine)
    assert decode_stream_line(SUBJECT, raw, 5).message == "x" * 40 + "\\xff\\xfe"
    assert decode_line(raw).message == "x" * 40 + "\\xff\\xfe"
    assert decode_line_lenient(codec.encode(lc_line())) == lc_line()
    batch = split_batch([(1, raw), (2, b"\xc1\xff junk"), (3, codec.encode(lc_line()))])
    assert batch.stored == [0, 2] and batch.malformed == [1]


def test_garbage_on_the_stream_shows_as_a_warning_from_its_subject() -> None:
    shown = decode_stream_line(SUBJECT, b"\xc1 not msgpack \xff", 5)
    assert (shown.kind, shown.source, shown.app, shown.level, shown.ts_ms) == ("runtime", "rp-1", "demo", "warning", 5)
    assert shown.message == "[not a log line] \\xc1 not msgpack \\xff"
    with pytest.raises(InvalidInputError):
        decode_line(b"\xc1 not msgpack")


def test_before_seq_bounds_the_query() -> None:
    plan = plan_query(LogQuery(app="demo", before_seq=42, limit=5), 10)
    assert plan.sql.split(" WHERE ")[1].startswith("env = $1 AND app = $2 AND seq < $3 ")
    assert plan.params == ("main", "demo", 42, 6)
    with pytest.raises(InvalidInputError, match="before_seq"):
        plan_query(LogQuery(app="demo", before_seq=-1, limit=5), 10)


class ReleasesOf:
    def __init__(self, *apps: str) -> None:
        self.apps = apps

    async def request(self, subject: str, message: Any, reply_type: type[Any]) -> ReleaseList:
        return ReleaseList(
            releases=[
                Release(
                    release_id=f"rel_{a}",
                    app=a,
                    env="main",
                    created_ms=1,
                    bundle_key="k",
                    bundle_digest="d",
                    image_id="",
                    spec=AppSpec(name=a, module="m"),
                    active=True,
                )
                for a in self.apps
            ]
        )


async def test_unknown_app_is_refused_naming_the_known_ones() -> None:
    await check_app(ReleasesOf("demo"), "main", "demo")  # type: ignore[arg-type]
    with pytest.raises(CliError, match="unknown app 'nope' in env 'main'") as info:
        await check_app(ReleasesOf("demo", "api"), "main", "nope")  # type: ignore[arg-type]
    assert info.value.hint == "apps in main: api, demo"


class SlowNats:
    def __init__(self) -> None:
        self.published: list[LogLine] = []

    async def publish(self, subject: str, data: bytes) -> None:
        self.published.append(codec.decode(data, LogLine))

    async def flush(self, timeout: float = 1) -> None:
        return None


def start(replica: str) -> StartReplica:
    return StartReplica(
        replica_id=replica,
        env="main",
        app="demo",
        release="rel_1",
        function="f",
        module="m",
        bundle_url="u",
        bundle_digest="d",
        stream="s",
        consumer="c",
    )


async def test_a_flooding_replica_is_rate_limited_with_a_counted_marker() -> None:
    nc = SlowNats()
    relay = LogRelay(nc, max_lines=10_000, rate=0.001, burst=5)  # type: ignore[arg-type]
    flood, calm = relay.sink(start("rp-flood")), relay.sink(start("rp-calm"))
    for i in range(1000):
        flood("stdout", f"spam {i}")  # never blocks, never raises
    calm("stdout", "calm line")
    task = asyncio.create_task(relay.run())
    try:
        await relay.flush()
        assert [ln.message for ln in nc.published] == [f"spam {i}" for i in range(5)] + ["calm line"]
        assert relay.dropped_total == 995
        relay.rate = 1e9  # the flood stops; its next line is preceded by the count of what was lost
        flood("stdout", "after")
        await relay.flush()
    finally:
        task.cancel()
    marker, after = nc.published[-2:]
    assert marker.message.startswith("[duanflow: 995 lines dropped: over") and marker.level == "warning"
    assert marker.replica == "rp-flood" and after.message == "after"


async def test_python_logging_records_keep_their_level_through_the_relay() -> None:
    import logging

    from duanflow._runtime.logcapture import LevelFormatter

    record = logging.LogRecord("app", logging.WARNING, __file__, 1, "disk %s\nsecond line", ("full",), None)
    written = LevelFormatter("%(message)s").format(record).splitlines()
    nc = SlowNats()
    relay = LogRelay(nc, max_lines=100)  # type: ignore[arg-type]
    tail: list[str] = []
    sink = relay.sink(start("rp-log"), also=lambda _s, line: tail.append(line))
    for line in [*written, "plain print"]:
        sink("stderr", line)
    task = asyncio.create_task(relay.run())
    try:
        await relay.flush()
    finally:
        task.cancel()
    assert [(ln.level, ln.message) for ln in nc.published] == [
        ("warning", "disk full"),
        ("warning", "second line"),
        ("info", "plain print"),
    ]
    assert tail == ["disk full", "second line", "plain print"]

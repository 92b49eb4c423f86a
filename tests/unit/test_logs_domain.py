"""The log service's pure rules: query plans, batch splitting, reply sizing."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest
from duanflow_logs.domain import COLUMNS, line_of, plan_query, reply_of, row_of, split_batch
from duanflow_proto import codec
from duanflow_proto.errors import InvalidInputError
from duanflow_proto.messages.common import Ack
from duanflow_proto.messages.logs import LogLine, LogQuery


def line(i: int = 0, message: str = "hello", **kw: str) -> LogLine:
    fields: dict[str, Any] = {"env": "main", "app": "demo", "kind": "runtime", "source": "rp-1", **kw}
    return LogLine(ts_ms=1000 + i, message=message, **fields)


@pytest.mark.parametrize(
    ("query", "where", "params"),
    [
        (LogQuery(app="demo"), "env = $1 AND app = $2", ("main", "demo", 1001)),
        (
            LogQuery(env="prod", app="demo", kind="build", limit=10),
            "env = $1 AND app = $2 AND kind = $3",
            ("prod", "demo", "build", 11),
        ),
        (
            LogQuery(app="demo", since_ms=5, until_ms=9, limit=2),
            "env = $1 AND app = $2 AND ts_ms >= $3 AND ts_ms <= $4",
            ("main", "demo", 5, 9, 3),
        ),
        (
            LogQuery(app="demo", function="predict", search="50%_off", limit=1),
            "env = $1 AND app = $2 AND function = $3 AND strpos(lower(message), lower($4)) > 0",
            ("main", "demo", "predict", "50%_off", 2),
        ),
    ],
)
def test_plan_query(query: LogQuery, where: str, params: tuple[object, ...]) -> None:
    plan = plan_query(query, max_lines=5000)
    assert plan.sql == (
        f"SELECT {', '.join(COLUMNS)} FROM lines WHERE {where} ORDER BY ts_ms, seq LIMIT ${len(params)}"
    )
    assert plan.params == params
    assert plan.limit == query.limit


def test_values_never_enter_the_sql() -> None:
    evil = "x'); DROP TABLE lines; --"
    plan = plan_query(LogQuery(app="demo", function=evil, search=evil), max_lines=10_000)
    assert evil not in plan.sql and evil in plan.params


@pytest.mark.parametrize(
    ("query", "field"),
    [
        (LogQuery(app="Not An App!"), "app"),
        (LogQuery(app=""), "app"),
        (LogQuery(env="a.b", app="demo"), "env"),
        (LogQuery(app="demo", kind="bogus"), "kind"),
        (LogQuery(app="demo", limit=0), "limit"),
        (LogQuery(app="demo", limit=10_001), "limit"),
        (LogQuery(app="demo", since_ms=-1), "since_ms"),
        (LogQuery(app="demo", since_ms=10, until_ms=5), "until_ms"),
    ],
)
def test_plan_query_refuses_bad_queries(query: LogQuery, field: str) -> None:
    with pytest.raises(InvalidInputError) as exc:
        plan_query(query, max_lines=10_000)
    assert exc.value.details["field"] == field


def test_row_round_trip() -> None:
    original = line(3, release="rel_1", function="f", replica="rp-1", invocation="fc-1", stream="stderr")
    row = row_of(17, original)
    assert row[0] == 17 and len(row) == len(COLUMNS)
    assert line_of(dict(zip(COLUMNS, row, strict=True))) == msgspec.structs.replace(original, seq=17)


def test_split_batch_sets_garbage_aside() -> None:
    msgs = [
        (1, codec.encode(line(1))),
        (2, b"\x00garbage"),
        (3, codec.encode(Ack())),  # a valid message, but not a log line
        (4, codec.encode(line(4))),
    ]
    batch = split_batch(msgs)
    assert batch.stored == [0, 3]
    assert [r[0] for r in batch.rows] == [1, 4]
    assert batch.malformed == [1, 2]
    assert all("LogLine" in e for e in batch.errors)


def test_reply_of_limits_and_truncates() -> None:
    lines = [line(i) for i in range(6)]
    assert reply_of(lines, limit=6).truncated is False
    five = reply_of(lines, limit=5)
    assert five.lines == lines[:5] and five.truncated is True


def test_reply_of_fits_the_byte_budget() -> None:
    lines = [line(i, message="x" * 1000) for i in range(50)]
    reply = reply_of(lines, limit=50, max_bytes=10_000)
    assert 0 < len(reply.lines) < 10 and reply.truncated is True
    assert len(codec.encode(reply)) < 12_000
    # one line over the budget is still answered, so a caller can always make progress
    assert len(reply_of(lines, limit=50, max_bytes=10).lines) == 1

"""``duanflow logs`` reading through the log service and the stream as one timeline, on real NATS and Postgres."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import msgspec
import nats
import pytest
from duanflow._cli.logs import read_logs
from duanflow_kit.handlers import decode_reply
from duanflow_logs.app import LogsApp, build_app
from duanflow_logs.domain import plan_query
from duanflow_logs.settings import Settings
from duanflow_proto import codec, subjects
from duanflow_proto.messages.common import HealthReply, HealthRequest
from duanflow_proto.messages.logs import LogLine, LogQuery, LogQueryReply
from fixtures.waiting import eventually

pytestmark = pytest.mark.timeout(60)
T = TypeVar("T")


class NatsOnlyClient:
    """The two things ``read_logs`` asks of the SDK client, on a plain connection."""

    def __init__(self, nc: Any) -> None:
        self.nc = nc

    async def connect(self) -> Any:
        return self.nc

    async def request(self, subject: str, message: msgspec.Struct, reply_type: type[T], timeout: float = 5) -> T:
        msg = await self.nc.request(subject, codec.encode(message), timeout=timeout)
        reply: T = decode_reply(msg.data, reply_type)
        return reply


@pytest.fixture
async def tl_logs(infra: Any, unique: str, nc_service: Any) -> AsyncIterator[LogsApp]:
    app = build_app(
        Settings(
            nats_url=infra.nats_url,
            nats_user="service",
            nats_password=infra.nats.service,
            database_url=infra.postgres_dsn,
            s3_endpoint=infra.s3_endpoint,
            s3_access_key=infra.s3.access_key,
            s3_secret_key=infra.s3.secret_key,
            s3_bucket=infra.bucket,
            schema=f"logs_{unique}",
            consumer=f"logs_{unique}",
            filter_subject=subjects.logs_filter("main", unique),
            batch_size=64,
        )
    )
    task = asyncio.create_task(app.run())

    async def ready() -> bool:
        msg = await nc_service.request(subjects.health("logs"), codec.encode(HealthRequest()), timeout=2)
        h: HealthReply = decode_reply(msg.data, HealthReply)
        return h.ok and h.details.get("db") == "ok"

    try:
        await eventually(ready, timeout=30)
        yield app
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await app.service.broker.stop()


def tl_line(app: str, i: int, base_ms: int, **kw: Any) -> LogLine:
    return LogLine(
        ts_ms=base_ms + i,
        env="main",
        app=app,
        kind="runtime",
        source="rp-1",
        message=f"line {i}",
        function=f"f{i % 2}",
        **kw,
    )


async def tl_publish(nc: Any, ln: LogLine) -> int:
    ack = await nc.jetstream().publish(subjects.logs(ln.env, ln.app, ln.kind, ln.source), codec.encode(ln))
    return int(ack.seq)


async def tl_read(nc: Any, app: str, **kw: Any) -> list[LogLine]:
    shown: list[LogLine] = []
    kw.setdefault("since", datetime.now(UTC) - timedelta(hours=1))
    await read_logs(
        NatsOnlyClient(nc),  # type: ignore[arg-type]
        env="main",
        app=app,
        kind=kw.pop("kind", None),
        follow=False,
        show=shown.append,
        check=False,
        **kw,
    )
    return shown


async def test_aged_out_lines_come_from_the_log_service_then_the_stream(
    tl_logs: LogsApp, nc_service: Any, unique: str, infra: Any
) -> None:
    base = int(time.time() * 1000) - 60_000
    seqs = [await tl_publish(nc_service, tl_line(unique, i, base)) for i in range(30)]

    async def stored() -> bool:
        return len(await tl_logs.store().query(plan_query(LogQuery(app=unique, limit=100), 100))) == 30

    await eventually(stored, timeout=20)
    # lines 0..19 age out of the stream: only the log service has them now
    await nc_service.jetstream().purge_stream(
        subjects.STREAM_LOGS, subject=subjects.logs_filter("main", unique), seq=seqs[20]
    )
    client = await nats.connect(infra.nats_url, user="client", password=infra.nats.client)  # the CLI's role
    try:
        lines = await tl_read(client, unique)
    finally:
        await client.close()
    assert [ln.message for ln in lines] == [f"line {i}" for i in range(30)]  # in order, no gap, no duplicate
    assert [ln.seq for ln in lines[:20]] == seqs[:20]

    only = await tl_read(nc_service, unique, function="f1", search="LINE 2")
    assert [ln.message for ln in only] == ["line 21", "line 23", "line 25", "line 27", "line 29"]
    until = await tl_read(nc_service, unique, until=datetime.fromtimestamp((base + 4) / 1000, UTC))
    assert [ln.message for ln in until] == [f"line {i}" for i in range(5)]


async def test_lines_still_on_the_stream_are_shown_once(tl_logs: LogsApp, nc_service: Any, unique: str) -> None:
    base = int(time.time() * 1000)
    for i in range(10):
        await tl_publish(nc_service, tl_line(unique, i, base))
    lines = await tl_read(nc_service, unique)
    assert [ln.message for ln in lines] == [f"line {i}" for i in range(10)]


async def test_a_line_that_is_not_utf8_is_escaped_on_both_paths(tl_logs: LogsApp, nc_service: Any, unique: str) -> None:
    raw = codec.encode(tl_line(unique, 0, int(time.time() * 1000), release="XXXX")).replace(b"XXXX", b"\xff\xfe\xfd!")
    await nc_service.jetstream().publish(subjects.logs("main", unique, "runtime", "rp-1"), raw)
    await nc_service.jetstream().publish(subjects.logs("main", unique, "runtime", "rp-1"), b"\xc1 garbage")
    lines = await tl_read(nc_service, unique)
    assert lines[0].release == "\\xff\\xfe\\xfd!" and lines[0].message == "line 0"
    assert lines[1].level == "warning" and lines[1].message.startswith("[not a log line]")

    async def stored() -> LogQueryReply:
        msg = await nc_service.request(subjects.API_LOG_QUERY, codec.encode(LogQuery(app=unique)), timeout=5)
        reply: LogQueryReply = decode_reply(msg.data, LogQueryReply)
        assert len(reply.lines) == 1
        return reply

    assert (await eventually(stored, timeout=20)).lines[0].release == "\\xff\\xfe\\xfd!"


async def test_follow_shows_a_new_line_quickly(tl_logs: LogsApp, nc_service: Any, unique: str) -> None:
    got: asyncio.Queue[tuple[float, LogLine]] = asyncio.Queue()
    task = asyncio.create_task(
        read_logs(
            NatsOnlyClient(nc_service),  # type: ignore[arg-type]
            env="main",
            app=unique,
            kind=None,
            since=None,
            follow=True,
            show=lambda ln: got.put_nowait((time.perf_counter(), ln)),
            check=False,
        )
    )
    try:
        await tl_publish(nc_service, tl_line(unique, 0, int(time.time() * 1000)))
        await asyncio.wait_for(got.get(), 10)  # the consumer is live
        delays = []
        for i in range(1, 50):
            sent = time.perf_counter()
            await tl_publish(nc_service, tl_line(unique, i, int(time.time() * 1000)))
            at, ln = await asyncio.wait_for(got.get(), 5)
            assert ln.message == f"line {i}"
            delays.append(at - sent)
        assert sorted(delays)[int(len(delays) * 0.99)] < 0.1, delays
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

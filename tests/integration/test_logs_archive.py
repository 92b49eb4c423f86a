"""The log archive on real NATS, Postgres and S3: hours older than the cut-off move to S3 (gzip, by hour, indexed
in Postgres) and queries and ``duanflow logs --since 7d`` read archive, Postgres and stream as one timeline."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import msgspec
import pytest
from duanflow._cli.logs import read_logs
from duanflow_kit.handlers import decode_reply
from duanflow_logs.app import LogsApp, build_app
from duanflow_logs.domain import HOUR_MS, plan_query
from duanflow_logs.settings import Settings
from duanflow_proto import codec, subjects
from duanflow_proto.messages.common import HealthReply, HealthRequest
from duanflow_proto.messages.logs import LogLine, LogQuery, LogQueryReply
from fixtures.waiting import eventually

pytestmark = pytest.mark.timeout(90)
T = TypeVar("T")


class ArNatsClient:
    def __init__(self, nc: Any) -> None:
        self.nc = nc

    async def connect(self) -> Any:
        return self.nc

    async def request(self, subject: str, message: msgspec.Struct, reply_type: type[T], timeout: float = 10) -> T:
        msg = await self.nc.request(subject, codec.encode(message), timeout=timeout)
        reply: T = decode_reply(msg.data, reply_type)
        return reply


@pytest.fixture
async def ar_logs(infra: Any, unique: str, nc_service: Any) -> AsyncIterator[LogsApp]:
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
            archive_after_s=3600,
            archive_interval_s=3600,
        )
    )
    task = asyncio.create_task(app.run())

    async def ready() -> bool:
        msg = await nc_service.request(subjects.health("logs"), codec.encode(HealthRequest()), timeout=2)
        h: HealthReply = decode_reply(msg.data, HealthReply)
        return h.ok and h.details.get("db") == "ok" and app.archiver is not None

    try:
        await eventually(ready, timeout=30)
        yield app
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await app.service.broker.stop()


async def ar_query(nc: Any, q: LogQuery) -> LogQueryReply:
    msg = await nc.request(subjects.API_LOG_QUERY, codec.encode(q), timeout=10)
    reply: LogQueryReply = decode_reply(msg.data, LogQueryReply)
    return reply


async def test_old_hours_move_to_s3_and_read_back_as_one_timeline(
    ar_logs: LogsApp, nc_service: Any, unique: str
) -> None:
    now_ms = int(time.time() * 1000)
    start = now_ms - now_ms % HOUR_MS - 3 * HOUR_MS  # three whole hours ago
    js = nc_service.jetstream()
    # 60 lines over 3.5 hours: the 2 whole hours before now - 1 h are archived, the rest stays in Postgres
    stamps = [start + i * (HOUR_MS * 7 // 2 // 60) for i in range(60)]
    for i, ts in enumerate(stamps):
        ln = LogLine(
            ts_ms=ts, env="main", app=unique, kind="build" if i % 3 else "runtime", source="rp-1", message=f"l{i}"
        )
        await js.publish(subjects.logs("main", unique, ln.kind, "rp-1"), codec.encode(ln))
    store = ar_logs.store()

    async def stored() -> bool:
        return len(await store.query(plan_query(LogQuery(app=unique, limit=100), 100))) == 60

    await eventually(stored, timeout=20)
    assert ar_logs.archiver is not None
    moved = await ar_logs.archiver.round(now_ms)
    old = sum(1 for ts in stamps if ts < now_ms - 3600_000 - (now_ms - 3600_000) % HOUR_MS)
    assert moved == old and 0 < old < 60
    assert len(await store.query(plan_query(LogQuery(app=unique, limit=100), 100))) == 60 - old
    refs = await store.archives("main", unique, 0, 0)
    assert [r.hour_ms for r in refs] == [start, start + HOUR_MS]  # whole hours before the cut-off
    assert sum(r.lines for r in refs) == old and refs[0].key.startswith(f"logs/main/{unique}/")
    raw = await ar_logs.bucket.get(refs[0].key)
    assert gzip.decompress(raw).count(b"\n") == refs[0].lines  # compressed JSON lines
    assert await ar_logs.archiver.round(now_ms) == 0  # nothing left to move

    every = await ar_query(nc_service, LogQuery(app=unique, limit=100))
    assert [ln.message for ln in every.lines] == [f"l{i}" for i in range(60)] and not every.truncated
    pages: list[str] = []
    q = LogQuery(app=unique, kind="runtime", limit=7)
    while True:
        page = await ar_query(nc_service, q)
        pages += [ln.message for ln in page.lines if ln.message not in pages]
        if not page.truncated:
            break
        q = msgspec.structs.replace(q, since_ms=page.lines[-1].ts_ms)
    assert pages == [f"l{i}" for i in range(0, 60, 3)]
    window = await ar_query(nc_service, LogQuery(app=unique, since_ms=stamps[10], until_ms=stamps[40]))
    assert [ln.message for ln in window.lines] == [f"l{i}" for i in range(10, 41)]

    # the stream lost everything up to line 50: `duanflow logs --since 7d` still shows 0..59 once each, in order
    last_seq = max(ln.seq for ln in every.lines)
    await js.purge_stream(subjects.STREAM_LOGS, subject=subjects.logs_filter("main", unique), seq=last_seq - 8)
    shown: list[LogLine] = []
    await read_logs(
        ArNatsClient(nc_service),  # type: ignore[arg-type]
        env="main",
        app=unique,
        kind=None,
        since=datetime.now(UTC) - timedelta(days=7),
        follow=False,
        show=shown.append,
        check=False,
    )
    assert [ln.message for ln in shown] == [f"l{i}" for i in range(60)]

"""The log service against real NATS and Postgres: ingestion, queries, garbage on both paths, SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from duanflow_kit.handlers import decode_reply
from duanflow_logs.app import LogsApp, build_app
from duanflow_logs.settings import Settings
from duanflow_proto import codec, subjects
from duanflow_proto.errors import InvalidInputError
from duanflow_proto.messages.common import HealthReply, HealthRequest
from duanflow_proto.messages.logs import LogLine, LogQuery, LogQueryReply
from fixtures.waiting import eventually

pytestmark = pytest.mark.timeout(60)


def settings_for(infra: Any, unique: str) -> Settings:
    return Settings(
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
        batch_size=16,
    )


async def health(nc: Any) -> HealthReply:
    msg = await nc.request(subjects.health("logs"), codec.encode(HealthRequest()), timeout=2)
    reply: HealthReply = decode_reply(msg.data, HealthReply)
    return reply


async def query(nc: Any, q: LogQuery) -> LogQueryReply:
    msg = await nc.request(subjects.API_LOG_QUERY, codec.encode(q), timeout=5)
    reply: LogQueryReply = decode_reply(msg.data, LogQueryReply)
    return reply


@pytest.fixture
async def logs(infra: Any, unique: str, nc_service: Any) -> AsyncIterator[LogsApp]:
    app = build_app(settings_for(infra, unique))
    task = asyncio.create_task(app.run())

    async def ready() -> bool:
        h = await health(nc_service)
        return h.ok and h.details.get("db") == "ok"

    try:
        await eventually(ready, timeout=30)
        yield app
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        # the service stops its broker when cancelled; this closes it even if that stop was cut short
        await app.service.broker.stop()


def line(app: str, i: int, kind: str = "runtime", **kw: Any) -> LogLine:
    return LogLine(
        ts_ms=1_700_000_000_000 + i, env="main", app=app, kind=kind, source="rp-1", message=f"line {i}", **kw
    )


async def publish(nc: Any, ln: LogLine) -> None:
    await nc.jetstream().publish(subjects.logs(ln.env, ln.app, ln.kind, ln.source), codec.encode(ln))


async def test_health_over_nats(logs: LogsApp, nc_service: Any) -> None:
    h = await health(nc_service)
    assert h.service == "logs" and h.ok and h.pid == os.getpid()
    assert h.details["stored"] == "0" and h.details["malformed"] == "0"


async def test_published_lines_become_queryable(logs: LogsApp, nc_service: Any, unique: str) -> None:
    for i in range(40):
        await publish(nc_service, line(unique, i, kind="build" if i % 4 == 0 else "runtime", function=f"f{i % 2}"))

    async def all_stored() -> LogQueryReply:
        reply = await query(nc_service, LogQuery(app=unique))
        assert len(reply.lines) == 40, len(reply.lines)
        return reply

    reply = await eventually(all_stored, timeout=20)
    assert [ln.message for ln in reply.lines] == [f"line {i}" for i in range(40)]  # oldest first
    assert reply.truncated is False

    build = await query(nc_service, LogQuery(app=unique, kind="build"))
    assert [ln.message for ln in build.lines] == [f"line {i}" for i in range(0, 40, 4)]

    since = await query(nc_service, LogQuery(app=unique, since_ms=1_700_000_000_030, limit=5))
    assert [ln.message for ln in since.lines] == [f"line {i}" for i in range(30, 35)] and since.truncated

    fn = await query(nc_service, LogQuery(app=unique, function="f1", search="LINE 3"))
    assert [ln.message for ln in fn.lines] == ["line 3", "line 31", "line 33", "line 35", "line 37", "line 39"]

    other_app = await query(nc_service, LogQuery(app=f"{unique}-other"))
    assert other_app.lines == []


async def test_garbage_query_gets_invalid_input_and_service_keeps_serving(
    logs: LogsApp, nc_service: Any, unique: str
) -> None:
    msg = await nc_service.request(subjects.API_LOG_QUERY, b"\x00\xffgarbage", timeout=5)
    with pytest.raises(InvalidInputError, match="LogQuery"):
        decode_reply(msg.data, LogQueryReply)
    with pytest.raises(InvalidInputError, match="unknown log kind"):
        await query(nc_service, LogQuery(app=unique, kind="bogus"))
    assert (await query(nc_service, LogQuery(app=unique))).lines == []


async def test_garbage_on_the_stream_does_not_stop_ingestion(logs: LogsApp, nc_service: Any, unique: str) -> None:
    js = nc_service.jetstream()
    await publish(nc_service, line(unique, 1))
    await js.publish(subjects.logs("main", unique, "runtime", "broken"), b"\x00 not a log line")
    await js.publish(subjects.logs("main", unique, "runtime", "broken"), codec.encode(HealthRequest()))
    await publish(nc_service, line(unique, 2))

    async def both_stored() -> bool:
        reply = await query(nc_service, LogQuery(app=unique))
        return [ln.message for ln in reply.lines] == ["line 1", "line 2"]

    await eventually(both_stored, timeout=20)

    async def counted() -> bool:
        h = await health(nc_service)
        return h.ok and h.details["malformed"] == "2" and h.details["stored"] == "2"

    await eventually(counted)


async def test_sigterm_exits_cleanly(infra: Any, nc_service: Any, unique: str) -> None:
    s = settings_for(infra, unique)
    env = {
        **os.environ,
        "DUANFLOW_NATS_URL": s.nats_url,
        "DUANFLOW_NATS_USER": s.nats_user,
        "DUANFLOW_NATS_PASSWORD": s.nats_password,
        "DUANFLOW_LOGS_DATABASE_URL": s.database_url,
        "DUANFLOW_LOGS_S3_ENDPOINT": s.s3_endpoint,
        "DUANFLOW_LOGS_S3_ACCESS_KEY": s.s3_access_key,
        "DUANFLOW_LOGS_S3_SECRET_KEY": s.s3_secret_key,
        "DUANFLOW_LOGS_SCHEMA": s.schema,
        "DUANFLOW_LOGS_CONSUMER": s.consumer,
        "DUANFLOW_LOGS_FILTER_SUBJECT": s.filter_subject,
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "duanflow_logs", env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    try:

        async def up() -> bool:
            h = await health(nc_service)
            assert h.pid == proc.pid and h.details.get("db") == "ok", h
            return True

        await eventually(up, timeout=30)
        await publish(nc_service, line(unique, 1))

        async def stored() -> bool:
            return len((await query(nc_service, LogQuery(app=unique))).lines) == 1

        await eventually(stored)
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        out, _ = await asyncio.wait_for(proc.communicate(), timeout=10)
        text = out.decode(errors="replace")
        assert proc.returncode == 0, text[-3000:]
        assert "Traceback" not in text, text[-3000:]
        assert time.monotonic() - started < 8
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()

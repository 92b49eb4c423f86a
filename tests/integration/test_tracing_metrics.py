"""Service metrics through OpenTelemetry, scraped in Prometheus' text format from a real log service."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from typing import Any

import pytest
from duanflow_kit.handlers import decode_reply
from duanflow_logs.app import build_app
from duanflow_logs.settings import Settings
from duanflow_proto import codec, subjects
from duanflow_proto.errors import InvalidInputError
from duanflow_proto.messages.common import HealthReply, HealthRequest
from duanflow_proto.messages.logs import LogQuery, LogQueryReply
from fixtures.waiting import eventually

pytestmark = pytest.mark.timeout(60)


def tm_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def tm_scrape(port: int) -> str:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    await writer.drain()
    raw = await reader.read()
    writer.close()
    head, _, body = raw.decode().partition("\r\n\r\n")
    assert head.startswith("HTTP/1.1 200") and "text/plain; version=0.0.4" in head
    return body


def tm_value(body: str, series: str) -> float:
    """The value of ``series`` in a scrape (0 when absent)."""
    for line in body.splitlines():
        if line.startswith(series + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def test_request_counts_and_latency_are_scrapeable(infra: Any, unique: str, nc_service: Any) -> None:
    port = tm_port()
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
            metrics_port=port,
        )
    )
    task = asyncio.create_task(app.run())

    async def ready() -> bool:
        msg = await nc_service.request(subjects.health("logs"), codec.encode(HealthRequest()), timeout=2)
        h: HealthReply = decode_reply(msg.data, HealthReply)
        return h.ok and h.details.get("db") == "ok"

    try:
        await eventually(ready, timeout=30)
        before = await tm_scrape(port)
        msg = await nc_service.request(subjects.API_LOG_QUERY, codec.encode(LogQuery(app=unique)), timeout=5)
        assert decode_reply(msg.data, LogQueryReply).lines == []
        msg = await nc_service.request(subjects.API_LOG_QUERY, codec.encode(LogQuery(app=unique, limit=0)), timeout=5)
        with pytest.raises(InvalidInputError):
            decode_reply(msg.data, LogQueryReply)
        body = await tm_scrape(port)
        q = f'service="logs",subject="{subjects.API_LOG_QUERY}"'
        for series in (
            f'duanflow_requests_total{{{q},outcome="ok"}}',
            f'duanflow_requests_total{{{q},outcome="error"}}',
            f'duanflow_request_duration_seconds_bucket{{{q},outcome="ok",le="+Inf"}}',
            f'duanflow_request_duration_seconds_count{{{q},outcome="error"}}',
        ):
            assert tm_value(body, series) == tm_value(before, series) + 1, series  # counters of this process
        assert "# TYPE duanflow_request_duration_seconds histogram" in body
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await app.service.broker.stop()

"""The gateway against real NATS: health over NATS, HTTP errors, a call answered by a stand-in replica, SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import AsyncIterator
from typing import Any

import httpx
import msgspec
import pytest
from duanflow_gateway.app import GatewayApp, build_app
from duanflow_gateway.settings import Settings
from duanflow_kit.handlers import decode_reply
from duanflow_proto import codec, subjects
from duanflow_proto.messages.common import HealthReply, HealthRequest
from duanflow_proto.messages.invocation import HDR_REPLY, Invocation, Result
from duanflow_proto.messages.logs import LogLine
from duanflow_proto.messages.release import EndpointSpec, RouteEntry
from fixtures.waiting import eventually
from nats.js.api import AckPolicy, ConsumerConfig

pytestmark = pytest.mark.timeout(60)


async def health(nc: Any) -> HealthReply:
    msg = await nc.request(subjects.health("gateway"), codec.encode(HealthRequest()), timeout=2)
    reply: HealthReply = decode_reply(msg.data, HealthReply)
    return reply


@pytest.fixture
async def gateway(infra: Any, nc_service: Any) -> AsyncIterator[GatewayApp]:
    settings = Settings(
        nats_url=infra.nats_url,
        nats_user="service",
        nats_password=infra.nats.service,
        http_port=0,
        max_body_bytes=1000,
        default_timeout_s=5,
    )
    app = build_app(settings)
    task = asyncio.create_task(app.run())

    async def serving() -> bool:
        h = await health(nc_service)
        return h.ok and h.details.get("routes_loaded") == "yes" and app.http_port > 0

    try:
        await eventually(serving, timeout=20)
        yield app
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        # the service stops its broker when cancelled; this closes it even if that stop was cut short
        await app.service.broker.stop()


@pytest.fixture
async def http(gateway: GatewayApp) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{gateway.http_port}", timeout=10) as client:
        yield client


def route(app: str, function: str, method: str, path: str, timeout_s: float = 10) -> RouteEntry:
    return RouteEntry(
        method=method,
        path=path,
        env="main",
        app=app,
        function=function,
        release="rel_20260101_0000",
        subject=subjects.invocation("main", app, function),
        endpoint=EndpointSpec(method=method, path=path),
        timeout_s=timeout_s,
    )


async def put_route(nc: Any, entry: RouteEntry) -> str:
    kv = await nc.jetstream().key_value(subjects.KV_ROUTES)
    key = f"{entry.env}.{entry.app}.{entry.function}"
    await kv.put(key, codec.encode(entry))
    return key


async def test_health_over_nats(gateway: GatewayApp, nc_service: Any) -> None:
    h = await health(nc_service)
    assert h.service == "gateway" and h.ok and h.pid == os.getpid()
    assert h.details["http"] == f"127.0.0.1:{gateway.http_port}"


async def test_http_errors(http: httpx.AsyncClient, nc_service: Any, unique: str) -> None:
    resp = await http.get("/healthz")
    assert resp.status_code == 200 and resp.json() == {"status": "ok"}

    resp = await http.post(f"/{unique}/nothing-here", json={})
    assert resp.status_code == 404 and resp.json()["error"]["code"] == "not_found"

    await put_route(nc_service, route(unique, "echo", "POST", f"/{unique}/echo"))

    async def bad_body_is_400() -> bool:
        resp = await http.post(f"/{unique}/echo", content=b"{not json")
        assert resp.status_code == 400, resp.text
        return bool(resp.json()["error"]["code"] == "invalid_input")

    await eventually(bad_body_is_400)
    resp = await http.post(f"/{unique}/echo", content=b"[" + b"1," * 1000 + b"1]")
    assert resp.status_code == 413 and resp.json()["error"]["code"] == "payload_too_large"


async def test_call_answered_by_a_replica(http: httpx.AsyncClient, nc_service: Any, unique: str) -> None:
    js = nc_service.jetstream()
    subject = subjects.invocation("main", unique, "echo")
    durable = subjects.consumer_name("main", unique, "echo")
    await js.add_consumer(
        subjects.STREAM_INVOCATIONS,
        ConsumerConfig(
            durable_name=durable, filter_subject=subject, ack_policy=AckPolicy.EXPLICIT, max_deliver=3, ack_wait=30
        ),
    )
    pull = await js.pull_subscribe_bind(durable=durable, stream=subjects.STREAM_INVOCATIONS)
    seen: list[Invocation] = []

    async def replica() -> None:
        while True:
            with contextlib.suppress(Exception):
                for msg in await pull.fetch(1, timeout=1):
                    inv = codec.decode(msg.data, Invocation)
                    seen.append(inv)
                    payload = msgspec.json.decode(inv.args)
                    value = msgspec.json.encode({"echo": payload["kwargs"], "path": payload["request"]["path"]})
                    result = Result(call_id=inv.call_id, ok=True, codec="json", value=value, replica_id="rp-test")
                    await nc_service.publish(msg.headers[HDR_REPLY], codec.encode(result))
                    await msg.ack()

    logged: list[LogLine] = []

    async def on_log(msg: Any) -> None:
        logged.append(codec.decode(msg.data, LogLine))

    log_sub = await nc_service.subscribe(subjects.logs_filter("main", unique, "request"), cb=on_log)
    task = asyncio.create_task(replica())
    try:
        await put_route(nc_service, route(unique, "echo", "POST", f"/{unique}/items/{{item_id}}"))

        async def answered() -> httpx.Response:
            resp = await http.post(f"/{unique}/items/7?lang=en", json={"text": "héllo"})
            assert resp.status_code == 200, resp.text
            return resp

        resp = await eventually(answered, timeout=15)
        assert resp.headers["content-type"].startswith("application/json")
        assert resp.json() == {"echo": {"lang": "en", "text": "héllo", "item_id": "7"}, "path": f"/{unique}/items/7"}
        assert seen[-1].codec == "json" and seen[-1].function == "echo" and seen[-1].deadline_ms > 0

        async def request_logged() -> bool:
            return any(ln.message.startswith(f"POST /{unique}/items/7 200 ") for ln in logged)

        await eventually(request_logged)
        assert logged[-1].invocation == seen[-1].call_id
    finally:
        await log_sub.unsubscribe()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await js.delete_consumer(subjects.STREAM_INVOCATIONS, durable)


async def test_no_replica_is_504_and_deleted_route_is_404(
    http: httpx.AsyncClient, nc_service: Any, unique: str
) -> None:
    key = await put_route(nc_service, route(unique, "slow", "GET", f"/{unique}/slow", timeout_s=0.5))

    async def timed_out() -> bool:
        resp = await http.get(f"/{unique}/slow")
        assert resp.status_code == 504, resp.text
        return bool(resp.json()["error"]["code"] == "timeout")

    await eventually(timed_out)
    kv = await nc_service.jetstream().key_value(subjects.KV_ROUTES)
    await kv.delete(key)

    async def gone() -> bool:
        return (await http.get(f"/{unique}/slow")).status_code == 404

    await eventually(gone)


async def test_routes_of_other_envs_are_not_served(http: httpx.AsyncClient, nc_service: Any, unique: str) -> None:
    kv = await nc_service.jetstream().key_value(subjects.KV_ROUTES)
    mine = route(unique, "mine", "GET", f"/{unique}/mine", timeout_s=0.3)
    other = msgspec.structs.replace(
        route(unique, "other", "GET", f"/{unique}/other"),
        env="prod",
        subject=subjects.invocation("prod", unique, "other"),
    )
    refused_before = int((await health(nc_service)).details["routes_refused"])
    await put_route(nc_service, other)  # key prod.<app>.other: another env's route
    # A key of this env whose entry says another env: left out, not served under either.
    spoof = msgspec.structs.replace(other, path=f"/{unique}/spoof")
    await kv.put(f"main.{unique}.spoof", codec.encode(spoof))
    await put_route(nc_service, mine)

    async def mine_served() -> bool:
        return (await http.get(f"/{unique}/mine")).status_code == 504  # routed (no replica runs it)

    await eventually(mine_served)
    assert (await http.get(f"/{unique}/other")).status_code == 404
    assert (await http.get(f"/{unique}/spoof")).status_code == 404
    assert int((await health(nc_service)).details["routes_refused"]) == refused_before + 1
    for key in (f"prod.{unique}.other", f"main.{unique}.spoof", f"main.{unique}.mine"):
        await kv.delete(key)


async def test_garbage_route_entry_is_left_out(gateway: GatewayApp, nc_service: Any, unique: str) -> None:
    kv = await nc_service.jetstream().key_value(subjects.KV_ROUTES)
    await kv.put(f"main.{unique}.garbage", b"\x00not a route")

    async def refused() -> bool:
        return (await health(nc_service)).details["routes_refused"] != "0"

    await eventually(refused)
    await kv.delete(f"main.{unique}.garbage")
    assert (await health(nc_service)).ok


async def test_sigterm_exits_cleanly(infra: Any, nc_service: Any) -> None:
    env = {
        **os.environ,
        "DUANFLOW_NATS_URL": infra.nats_url,
        "DUANFLOW_NATS_USER": "service",
        "DUANFLOW_NATS_PASSWORD": infra.nats.service,
        "DUANFLOW_GATEWAY_HTTP_PORT": "0",
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "duanflow_gateway",
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:

        async def up() -> HealthReply:
            h = await health(nc_service)
            assert h.pid == proc.pid and h.details.get("routes_loaded") == "yes", h
            return h

        h = await eventually(up, timeout=30)
        host, port = h.details["http"].rsplit(":", 1)
        async with httpx.AsyncClient() as client:
            assert (await client.get(f"http://{host}:{port}/healthz")).status_code == 200
        proc.send_signal(signal.SIGTERM)
        out, _ = await asyncio.wait_for(proc.communicate(), timeout=10)
        text = out.decode(errors="replace")
        assert proc.returncode == 0, text[-3000:]
        assert "Traceback" not in text, text[-3000:]
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()

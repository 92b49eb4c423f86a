"""``@app.endpoint`` end to end: HTTP → gateway process → real replicas (``python -m duanflow._runtime``) → HTTP,
on a real NATS server. Auth, limits, streaming and every error status a client can meet."""

from __future__ import annotations

import asyncio
import re
import textwrap
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import msgspec
import nats
import pytest
from duanflow._local import servers
from duanflow._runtime.worker import STREAM_FIRST_S
from duanflow_proto import codec, subjects
from duanflow_proto.messages.invocation import ReplicaLoad
from duanflow_proto.messages.logs import LogLine
from fixtures.gateway_stack import Stack, deploy, gateway_stack, load_module, start_replica
from fixtures.waiting import eventually_sync
from nats.aio.client import Client as NatsClient

pytestmark = pytest.mark.timeout(120)

TOKEN = "sk-test-" + uuid.uuid4().hex

APP_SOURCE = """
import os
import threading
import time
from pathlib import Path

import duanflow as df

app = df.App("{app}", env={{"API_TOKEN": "{token}"}})


@app.endpoint(method="GET", path="/{app}/items/{{item_id}}")
def get_item(request: df.Request):
    return {{"id": request.path_params["item_id"], "q": request.query.get("q"), "method": request.method,
            "path": request.path, "auth_seen": "authorization" in request.headers}}


@app.endpoint(method="PUT", path="/{app}/items/{{item_id}}")
def put_item(request):
    return ["put", request.path_params["item_id"], request.json()]


@app.endpoint(method="DELETE", path="/{app}/items/{{item_id}}")
def delete_item(request):
    return df.Response(status=204, headers={{"X-Deleted": request.path_params["item_id"]}}, body=b"")


@app.endpoint(method="PATCH", path="/{app}/kwargs/{{item_id}}")
def patch_kwargs(item_id, name=None, q=None):
    return {{"item_id": item_id, "name": name, "q": q}}


@app.endpoint(method="GET", path="/{app}/mixed/{{item_id}}")
def mixed(request: df.Request, item_id: str, q: str = "none"):
    return {{"item_id": item_id, "q": q, "path": request.path}}


@app.endpoint(method="POST", path="/{app}/text")
def text(request):
    return "hello " + request.text()


@app.endpoint(method="POST", path="/{app}/bytes")
def raw(request):
    return bytes(reversed(request.body))


@app.endpoint(method="POST", path="/{app}/created")
def created(request):
    return df.Response(201, {{"Location": "/x/7"}}, {{"id": 7, "got": request.json()}})


@app.endpoint(method="GET", path="/{app}/count")
def count(request):
    n = int(request.query.get("n", "3"))
    return ({{"i": i}} for i in range(n))


@app.endpoint(method="GET", path="/{app}/events", stream="sse")
async def events(request):
    for word in ["a", "b c", "d"]:
        yield word


@app.endpoint(method="POST", path="/{app}/private", auth=df.Auth.bearer("API_TOKEN"))
def private(request):
    return {{"ok": True, "headers": sorted(request.headers)}}


@app.endpoint(method="GET", path="/{app}/gate", burst=1, timeout=20)
def gate(request):
    path = Path(request.query["file"])
    while not path.exists():
        threading.Event().wait(0.01)  # the app under test polls; the test itself never sleeps
    return "opened"


@app.endpoint(method="GET", path="/{app}/hold", timeout=20)
def hold(request):
    path = Path(request.query["file"])
    while not path.exists():
        threading.Event().wait(0.01)
    return request.query["tag"]


@app.endpoint(method="GET", path="/{app}/slow", timeout=1)
def slow(request):
    threading.Event().wait(5)
    return "late"


@app.endpoint(method="GET", path="/{app}/where", timeout=1)
def where(request):
    spin = float(request.query.get("spin", "0"))
    end = time.monotonic() + spin
    while time.monotonic() < end:  # Python code: interruptible where it runs
        pass
    return threading.current_thread().name


@app.endpoint(method="GET", path="/{app}/crash")
def crash(request):
    threading.Event().wait(float(request.query.get("after", "1")))
    os._exit(3)


@app.endpoint(method="GET", path="/{app}/boom")
def boom(request):
    raise ValueError("boom")


@app.endpoint(method="POST", path="/{app}/strict")
def strict(request):
    return request.json()
"""


@pytest.fixture(scope="module")
def stack(
    nats_server: tuple[servers.Proc, servers.NatsCredentials], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("gw")
    app_name = "gw" + uuid.uuid4().hex[:8]
    module_name = f"gw_app_{app_name}"
    app_dir = root / "app"
    app_dir.mkdir()
    path = app_dir / f"{module_name}.py"
    path.write_text(textwrap.dedent(APP_SOURCE.format(app=app_name, token=TOKEN)))
    module = load_module(path, module_name)
    with gateway_stack(nats_server, root, max_body_bytes="65536") as s:
        s.app = app_name  # type: ignore[attr-defined]
        s.module, s.app_dir = module, app_dir  # type: ignore[attr-defined]
        deploy(s, module, app_dir)
        yield s


@pytest.fixture
def http(stack: Stack) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=stack.gateway_url, timeout=30) as client:
        yield client


def app_of(stack: Stack) -> str:
    return str(stack.app)  # type: ignore[attr-defined]


def error_code(resp: httpx.Response) -> str:
    body = resp.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}, body
    return str(body["error"]["code"])


def test_health_ready_and_openapi(http: httpx.Client, stack: Stack) -> None:
    assert http.get("/healthz").json() == {"status": "ok"}
    assert http.get("/readyz").status_code == 200
    doc = http.get("/openapi.json").json()
    a = app_of(stack)
    assert doc["openapi"].startswith("3.")
    op = doc["paths"][f"/{a}/items/{{item_id}}"]["get"]
    assert op["parameters"][0]["name"] == "item_id"
    assert doc["paths"][f"/{a}/private"]["post"]["security"] == [{"bearer": []}]


def test_path_params_query_and_methods(http: httpx.Client, stack: Stack) -> None:
    a = app_of(stack)
    resp = http.get(f"/{a}/items/42", params={"q": "x y"}, headers={"Authorization": "Bearer nope"})
    assert resp.status_code == 200 and resp.headers["content-type"] == "application/json"
    assert resp.json() == {"id": "42", "q": "x y", "method": "GET", "path": f"/{a}/items/42", "auth_seen": False}
    assert http.put(f"/{a}/items/7", json={"n": 1}).json() == ["put", "7", {"n": 1}]
    resp = http.delete(f"/{a}/items/9")
    assert resp.status_code == 204 and resp.headers["x-deleted"] == "9" and resp.content == b""
    resp = http.patch(f"/{a}/kwargs/5", params={"q": "qq"}, json={"name": "n"})
    assert resp.json() == {"item_id": "5", "name": "n", "q": "qq"}
    assert http.get(f"/{a}/mixed/3", params={"q": "z"}).json() == {"item_id": "3", "q": "z", "path": f"/{a}/mixed/3"}
    resp = http.patch(f"/{a}/kwargs/5", json={"unexpected": 1})
    assert resp.status_code == 400 and error_code(resp) == "invalid_input"


def test_return_types(http: httpx.Client, stack: Stack) -> None:
    a = app_of(stack)
    resp = http.post(f"/{a}/text", content=b"world", headers={"content-type": "text/plain"})
    assert resp.text == "hello world" and resp.headers["content-type"].startswith("text/plain")
    resp = http.post(f"/{a}/bytes", content=b"\x00\x01\xff", headers={"content-type": "application/octet-stream"})
    assert resp.content == b"\xff\x01\x00" and resp.headers["content-type"] == "application/octet-stream"
    resp = http.post(f"/{a}/created", json={"a": 1})
    assert resp.status_code == 201 and resp.headers["location"] == "/x/7" and resp.json() == {"id": 7, "got": {"a": 1}}


def test_generator_streams_chunks_and_sse(http: httpx.Client, stack: Stack) -> None:
    a = app_of(stack)
    for n in range(6):  # the later calls, once fast, begin on the replica's read loop and stream from a task
        with http.stream("GET", f"/{a}/count", params={"n": str(n)}) as resp:
            assert resp.status_code == 200 and resp.headers.get("transfer-encoding") == "chunked"
            lines = [msgspec.json.decode(line) for line in resp.iter_lines() if line]
        assert lines == [{"i": i} for i in range(n)]
    with http.stream("GET", f"/{a}/count", params={"n": "2"}, headers={"accept": "text/event-stream"}) as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        assert resp.read() == b'data: {"i":0}\n\ndata: {"i":1}\n\n'
    resp = http.get(f"/{a}/events")
    assert resp.headers["content-type"].startswith("text/event-stream")
    assert resp.content == b"data: a\n\ndata: b c\n\ndata: d\n\n"


def test_bearer_auth(http: httpx.Client, stack: Stack) -> None:
    a = app_of(stack)
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"}):
        resp = http.post(f"/{a}/private", json={}, headers=headers)
        assert resp.status_code == 401 and error_code(resp) == "unauthenticated"
        assert resp.headers["www-authenticate"].startswith("Bearer")
    resp = http.post(f"/{a}/private", json={}, headers={"Authorization": f"Bearer {TOKEN}", "Cookie": "s=1"})
    assert resp.status_code == 200, resp.text
    assert "authorization" not in resp.json()["headers"] and "cookie" not in resp.json()["headers"]


def test_errors_are_json_and_the_gateway_keeps_serving(http: httpx.Client, stack: Stack) -> None:
    a = app_of(stack)
    resp = http.get(f"/{a}/nowhere")
    assert resp.status_code == 404 and error_code(resp) == "not_found"
    resp = http.post(f"/{a}/strict", content=b"{nope", headers={"content-type": "application/json"})
    assert resp.status_code == 400 and error_code(resp) == "invalid_input"
    resp = http.post(f"/{a}/strict", content=b"x" * 70_000, headers={"content-type": "application/json"})
    assert resp.status_code == 413 and error_code(resp) == "payload_too_large"
    resp = http.get(f"/{a}/slow")
    assert resp.status_code == 504 and error_code(resp) in ("timeout", "function_timeout")
    resp = http.get(f"/{a}/boom")
    assert resp.status_code == 500 and "boom" in resp.json()["error"]["message"]
    assert http.post(f"/{a}/strict", json={"still": "serving"}).json() == {"still": "serving"}


def test_a_fast_sync_handler_runs_on_the_loop_thread_and_an_overrun_there_is_a_504(
    http: httpx.Client, stack: Stack
) -> None:
    a = app_of(stack)
    threads = [http.get(f"/{a}/where").text for _ in range(6)]
    assert threads[0] != "MainThread", "the first calls run in the pool, until they prove fast"
    assert threads[-1] == "MainThread", threads
    started = time.monotonic()
    resp = http.get(f"/{a}/where", params={"spin": "5"})
    assert resp.status_code == 504 and error_code(resp) in ("timeout", "function_timeout")
    assert time.monotonic() - started < 4, "interrupted at its 1 s timeout, not run to the end"
    # One slow call sends the handler back to the pool; the replica keeps serving.
    resp = http.get(f"/{a}/where")
    assert resp.status_code == 200 and resp.text != "MainThread"


def test_burst_limit_gives_429_with_retry_after(http: httpx.Client, stack: Stack, tmp_path: Path) -> None:
    a = app_of(stack)
    gate = tmp_path / "open"

    async def scenario() -> None:
        async with httpx.AsyncClient(base_url=stack.gateway_url, timeout=30) as client:
            first = asyncio.ensure_future(client.get(f"/{a}/gate", params={"file": str(gate)}))

            async def limited() -> httpx.Response:
                while True:
                    resp = await client.get(f"/{a}/gate", params={"file": str(gate)})
                    if resp.status_code == 429:
                        return resp
                    assert not first.done(), "the gate opened by itself"

            second = await asyncio.wait_for(limited(), 20)
            assert error_code(second) == "rate_limited" and second.headers["retry-after"] == "1"
            gate.write_text("go")
            assert (await first).text == "opened"

    asyncio.run(scenario())


def test_replica_crash_mid_request_is_502(http: httpx.Client, stack: Stack) -> None:
    a = app_of(stack)
    resp = http.get(f"/{a}/crash", params={"after": "1"})
    assert resp.status_code == 502 and error_code(resp) == "bad_gateway", resp.text
    assert http.get(f"/{a}/items/1").status_code == 200


def test_request_logs_carry_no_bodies_or_tokens(http: httpx.Client, stack: Stack) -> None:
    a = app_of(stack)
    ours = f"POST /{a}/private "
    lines: list[LogLine] = []

    async def capture() -> None:
        nc = await nats.connect(stack.nats_url, user="service", password=stack.creds.service)
        try:
            sub = await nc.subscribe(subjects.logs(stack.env, a, "request", "gateway"))
            await nc.flush()
            async with httpx.AsyncClient(base_url=stack.gateway_url, timeout=30) as client:
                resp = await client.post(
                    f"/{a}/private?secret=querytoken",
                    json={"body": "BODYSECRET"},
                    headers={"Authorization": f"Bearer {TOKEN}"},
                )
                assert resp.status_code == 200
            # The gateway sends request lines in batches (up to LOG_FLUSH_S late): lines of the previous tests'
            # requests may still arrive first. Ours is the one for its method and path.
            while not any(line.message.startswith(ours) for line in lines):
                msg = await sub.next_msg(timeout=10)
                lines.append(codec.decode(msg.data, LogLine))
        finally:
            await nc.close()

    asyncio.run(capture())
    [line] = [line for line in lines if line.message.startswith(ours)]
    assert line.kind == "request" and line.source == "gateway" and line.function == "private"
    assert re.fullmatch(rf"POST /{a}/private 200 \d+\.\dms", line.message), line.message
    assert line.invocation.startswith("fc-") and line.level == "info"
    for secret in (TOKEN, "BODYSECRET", "querytoken"):
        for any_line in lines:
            assert secret not in msgspec.json.encode(any_line).decode()


def test_route_changes_without_restart(http: httpx.Client, stack: Stack) -> None:
    a = app_of(stack)

    async def drop() -> None:
        nc = await nats.connect(stack.nats_url, user="service", password=stack.creds.service)
        try:
            kv = await nc.jetstream().key_value(subjects.KV_ROUTES)
            await kv.delete(f"{stack.env}.{a}.boom")
        finally:
            await nc.close()

    asyncio.run(drop())
    eventually_sync(lambda: http.get(f"/{a}/boom").status_code == 404)


async def _consumer(nc: NatsClient, stack: Stack, fn: str) -> tuple[int, int]:
    """(delivered sequence, calls in the stream not yet acked: waiting or delivered) of ``fn``'s durable consumer."""
    info = await nc.jetstream().consumer_info(
        subjects.STREAM_INVOCATIONS, subjects.consumer_name(stack.env, app_of(stack), fn)
    )
    return (info.delivered.consumer_seq if info.delivered else 0), (info.num_pending or 0) + (info.num_ack_pending or 0)


def test_warm_replicas_take_calls_directly_and_report_their_load(stack: Stack) -> None:
    a = app_of(stack)

    async def scenario() -> None:
        nc = await nats.connect(stack.nats_url, user="service", password=stack.creds.service)
        try:
            sub = await nc.subscribe(subjects.replica_load(stack.env, a, "get_item"))
            await nc.flush()
            before, _ = await _consumer(nc, stack, "get_item")
            async with httpx.AsyncClient(base_url=stack.gateway_url, timeout=30) as client:
                for i in range(5):
                    assert (await client.get(f"/{a}/items/{i}")).json()["id"] == str(i)
            # The calls never passed the consumer: the replica says what it did instead.
            assert (await _consumer(nc, stack, "get_item"))[0] == before
            while True:
                load = codec.decode((await sub.next_msg(timeout=10)).data, ReplicaLoad)
                if load.served >= 5:
                    break
            assert (load.env, load.app, load.function) == (stack.env, a, "get_item") and load.replica_id
        finally:
            await nc.close()

    asyncio.run(scenario())


def test_a_call_no_replica_can_take_now_waits_in_the_stream(stack: Stack, tmp_path: Path) -> None:
    a = app_of(stack)
    gate = tmp_path / "open"

    async def scenario() -> None:
        nc = await nats.connect(stack.nats_url, user="service", password=stack.creds.service)
        try:
            async with httpx.AsyncClient(base_url=stack.gateway_url, timeout=30) as client:
                params = {"file": str(gate)}
                # The replica (concurrency 1) takes one call; the other is answered Df-Busy and goes to the
                # stream, where it waits for the slot (in the stream, or delivered to the replica's queue).
                calls = [
                    asyncio.ensure_future(client.get(f"/{a}/hold", params={**params, "tag": tag}))
                    for tag in ("first", "second")
                ]
                for _ in range(500):
                    if (await _consumer(nc, stack, "hold"))[1]:
                        break
                    assert not any(c.done() for c in calls), [c.result().text for c in calls if c.done()]
                    await asyncio.sleep(0.02)
                else:
                    pytest.fail("no call waited in the stream")
                gate.write_text("go")
                assert sorted([(await c).text for c in calls]) == ["first", "second"]
                assert (await _consumer(nc, stack, "hold"))[1] == 0
        finally:
            await nc.close()

    asyncio.run(scenario())


def test_a_draining_replica_finishes_its_direct_call_and_sends_new_ones_to_the_stream(
    stack: Stack, tmp_path: Path
) -> None:
    a = app_of(stack)
    gate = tmp_path / "open"
    [replica] = stack.replicas["hold"]

    async def scenario() -> None:
        nc = await nats.connect(stack.nats_url, user="service", password=stack.creds.service)
        try:
            loads = await nc.subscribe(subjects.replica_load(stack.env, a, "hold"))
            await nc.flush()
            # A replica that just ran an input from the stream sends direct calls there for a moment (they queue
            # behind it): let that moment pass, so the first call is a direct one.
            await asyncio.sleep(2 * STREAM_FIRST_S)
            async with httpx.AsyncClient(base_url=stack.gateway_url, timeout=30) as client:
                params = {"file": str(gate)}
                first = asyncio.ensure_future(client.get(f"/{a}/hold", params={**params, "tag": "first"}))
                while codec.decode((await loads.next_msg(timeout=10)).data, ReplicaLoad).busy < 1:
                    pass  # until the replica says it runs the call
                _, waiting = await _consumer(nc, stack, "hold")
                replica.terminate()  # SIGTERM: drain
                second = asyncio.ensure_future(client.get(f"/{a}/hold", params={**params, "tag": "second"}))
                for _ in range(500):  # the draining replica takes no new call: it goes to the stream
                    if (await _consumer(nc, stack, "hold"))[1] > waiting:
                        break
                    await asyncio.sleep(0.02)
                else:
                    pytest.fail("the second call did not go to the stream")
                assert not first.done() and replica.poll() is None
                gate.write_text("go")
                assert (await first).text == "first"
                assert await asyncio.to_thread(replica.wait, 30) == 0
                # The call in the stream is the next replica's.
                module, app_dir = stack.module, stack.app_dir  # type: ignore[attr-defined]
                await asyncio.to_thread(start_replica, stack, module, app_dir, "hold", {}, 1, 20)
                assert (await second).text == "second"
        finally:
            await nc.close()

    asyncio.run(scenario())

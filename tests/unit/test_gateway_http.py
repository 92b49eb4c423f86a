"""The gateway's HTTP surface in process (Litestar's test client), with stand-ins for NATS."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

import msgspec
import pytest
from duanflow_gateway.domain import RouteTable
from duanflow_gateway.handlers import build_http
from duanflow_gateway.settings import Settings
from duanflow_proto.errors import DeadlineExceededError, DuanFlowError, UnavailableError
from duanflow_proto.messages.common import ErrorReply
from duanflow_proto.messages.invocation import Invocation, Result
from duanflow_proto.messages.logs import LogLine
from duanflow_proto.messages.release import EndpointSpec, RouteEntry
from litestar.testing import TestClient


class Routes:
    def __init__(self) -> None:
        self.table = RouteTable()


class Invoker:
    """Answers with ``self.answer(invocation)`` and records what it was asked."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Invocation, float]] = []
        self.more: list[Result | DuanFlowError] = []
        self.closed: list[str] = []
        self.answer: Callable[[Invocation], Result | DuanFlowError] = lambda inv: Result(
            call_id=inv.call_id, ok=True, codec="json", value=inv.args
        )

    async def invoke(
        self,
        subject: str,
        invocation: Invocation,
        timeout_s: float,
        trace_parent: Mapping[str, str] | None = None,
        *,
        direct: str = "",
    ) -> Result:
        self.calls.append((subject, invocation, timeout_s))
        answer = self.answer(invocation)
        if isinstance(answer, DuanFlowError):
            raise answer
        return answer

    async def next(self, call_id: str) -> Result:
        answer = self.more.pop(0)
        if isinstance(answer, DuanFlowError):
            raise answer
        return answer

    def close(self, call_id: str) -> None:
        self.closed.append(call_id)


def route(method: str, path: str, function: str, timeout_s: float = 300.0) -> RouteEntry:
    return RouteEntry(
        method=method,
        path=path,
        env="main",
        app="demo",
        function=function,
        release="rel_1",
        subject=f"duanflow.inv.main.demo.{function}",
        endpoint=EndpointSpec(method=method, path=path),
        timeout_s=timeout_s,
    )


@pytest.fixture
def invoker() -> Invoker:
    return Invoker()


@pytest.fixture
def client(invoker: Invoker) -> Iterator[TestClient]:  # type: ignore[type-arg]
    routes = Routes()
    routes.table.put("echo", route("POST", "/echo", "echo", timeout_s=7))
    routes.table.put("item", route("GET", "/items/{item_id}", "item"))
    with TestClient(build_http(routes, invoker, Settings(max_body_bytes=1000, default_timeout_s=3))) as c:  # type: ignore[type-var]
        yield c


def error_of(resp: object) -> dict[str, str]:
    body = msgspec.json.decode(resp.content)  # type: ignore[attr-defined]
    assert set(body) == {"error"}
    assert set(body["error"]) == {"code", "message"}
    return body["error"]  # type: ignore[no-any-return]


def test_healthz(client: TestClient) -> None:  # type: ignore[type-arg]
    resp = client.get("/healthz")
    assert resp.status_code == 200 and resp.json() == {"status": "ok"}


def test_unknown_route_is_404_json(client: TestClient, invoker: Invoker) -> None:  # type: ignore[type-arg]
    for method, path in [("GET", "/nope"), ("GET", "/"), ("GET", "/echo"), ("DELETE", "/items/1")]:
        resp = client.request(method, path)
        assert resp.status_code == 404, (method, path)
        assert error_of(resp)["code"] == "not_found"
    assert invoker.calls == []


def test_malformed_json_is_400(client: TestClient, invoker: Invoker) -> None:  # type: ignore[type-arg]
    resp = client.post("/echo", content=b"{nope", headers={"content-type": "application/json"})
    assert resp.status_code == 400
    assert error_of(resp)["code"] == "invalid_input"
    assert invoker.calls == []


def test_body_over_the_limit_is_413(client: TestClient, invoker: Invoker) -> None:  # type: ignore[type-arg]
    resp = client.post("/echo", content=b'{"a": "' + b"x" * 2000 + b'"}')
    assert resp.status_code == 413
    err = error_of(resp)
    assert err["code"] == "payload_too_large" and "1000 bytes" in err["message"]
    assert invoker.calls == []


def test_call_becomes_a_json_invocation(client: TestClient, invoker: Invoker) -> None:  # type: ignore[type-arg]
    resp = client.post("/echo?x=1", json={"text": "hi"}, headers={"Authorization": "Bearer s3cret"})
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("application/json")
    subject, inv, timeout_s = invoker.calls[0]
    assert subject == "duanflow.inv.main.demo.echo"
    assert (inv.function, inv.codec, timeout_s) == ("echo", "json", 7)
    assert inv.call_id.startswith("fc-") and inv.deadline_ms > 0
    payload = resp.json()
    assert payload["kwargs"] == {"x": "1", "text": "hi"}
    assert "authorization" not in payload["request"]["headers"]


def test_path_params_and_default_timeout(client: TestClient, invoker: Invoker) -> None:  # type: ignore[type-arg]
    resp = client.get("/items/42")
    assert resp.status_code == 200 and resp.json()["kwargs"] == {"item_id": "42"}
    assert invoker.calls[0][2] == 300.0  # the route's own timeout (RouteEntry default)


@pytest.mark.parametrize(
    ("value", "codec", "status", "media", "body"),
    [
        (b'"plain text"', "json", 200, "text/plain", b"plain text"),
        (b"\x89PNG", "bytes", 200, "application/octet-stream", b"\x89PNG"),
        (b"[1,2,3]", "json", 200, "application/json", b"[1,2,3]"),
    ],
)
def test_result_kinds(
    client: TestClient,  # type: ignore[type-arg]
    invoker: Invoker,
    value: bytes,
    codec: str,
    status: int,
    media: str,
    body: bytes,
) -> None:
    invoker.answer = lambda inv: Result(call_id=inv.call_id, ok=True, codec=codec, value=value)
    resp = client.post("/echo")
    assert resp.status_code == status
    assert resp.headers["content-type"].startswith(media)
    assert resp.content == body


def test_pickled_result_is_refused_with_502(client: TestClient, invoker: Invoker) -> None:  # type: ignore[type-arg]
    invoker.answer = lambda inv: Result(call_id=inv.call_id, ok=True, codec="cloudpickle", value=b"\x80\x04K\x01.")
    resp = client.post("/echo")
    assert resp.status_code == 502 and error_of(resp)["code"] == "bad_gateway"


@pytest.mark.parametrize(
    ("answer", "status", "code"),
    [
        (DeadlineExceededError("echo did not answer within 7s"), 504, "timeout"),
        (UnavailableError("stream down"), 503, "unavailable"),
        (
            lambda inv: Result(
                call_id=inv.call_id,
                ok=False,
                error=ErrorReply(code="remote_error", message="ValueError: no", exc_pickle=b"\x80garbage"),
            ),
            500,
            "remote_error",
        ),
    ],
)
def test_errors_map_to_their_status(
    client: TestClient,  # type: ignore[type-arg]
    invoker: Invoker,
    answer: object,
    status: int,
    code: str,
) -> None:
    invoker.answer = answer if callable(answer) else (lambda inv: answer)  # type: ignore[assignment,return-value]
    resp = client.post("/echo", json={})
    assert resp.status_code == status
    assert error_of(resp)["code"] == code


def test_route_bucket_changes_update_the_table() -> None:
    from duanflow_gateway.adapters.nats import KvRoutes
    from duanflow_proto import codec

    routes = KvRoutes(js=None)  # type: ignore[arg-type]
    routes.apply("main.demo.echo", codec.encode(route("POST", "/echo", "echo")))
    assert routes.table.match("POST", "/echo") is not None
    # an unusable update must not keep serving the entry it replaces
    routes.apply("main.demo.echo", b"\x00garbage")
    assert routes.table.match("POST", "/echo") is None and routes.refused == 1
    routes.apply("main.demo.echo", codec.encode(route("POST", "/echo2", "echo")))
    assert routes.table.match("POST", "/echo2") is not None and routes.refused == 0
    routes.apply("main.demo.echo", None)
    assert len(routes.table) == 0


class Lines:
    def __init__(self) -> None:
        self.lines: list[LogLine] = []

    async def publish(self, line: LogLine) -> None:
        self.lines.append(line)


def test_each_served_call_is_one_request_log_line(invoker: Invoker) -> None:
    routes = Routes()
    routes.table.put("echo", route("POST", "/echo", "echo"))
    lines = Lines()
    with TestClient(build_http(routes, invoker, Settings(max_body_bytes=100), lines)) as c:  # type: ignore[type-var]
        assert c.post("/echo?token=hidden", json={"password": "s3cret"}).status_code == 200
        assert c.post("/echo", content=b"{bad").status_code == 400
        assert c.post("/echo", content=b"x" * 200).status_code == 413
        invoker.answer = lambda inv: DeadlineExceededError("late")
        assert c.post("/echo").status_code == 504
        assert c.get("/unknown").status_code == 404  # no app to log it under
    assert [ln.message.split()[:3] for ln in lines.lines] == [
        ["POST", "/echo", "200"],
        ["POST", "/echo", "400"],
        ["POST", "/echo", "413"],
        ["POST", "/echo", "504"],
    ]
    assert [ln.level for ln in lines.lines] == ["info", "warning", "warning", "error"]
    first = lines.lines[0]
    assert (first.env, first.app, first.kind, first.function) == ("main", "demo", "request", "echo")
    assert first.invocation.startswith("fc-")
    assert all("s3cret" not in ln.message and "hidden" not in ln.message for ln in lines.lines)


def secured_client(invoker: Invoker, **endpoint: object) -> TestClient:  # type: ignore[type-arg]
    from duanflow_proto.messages.release import bearer_digest

    routes = Routes()
    e = route("POST", "/secure", "secure")
    e = msgspec.structs.replace(
        e,
        endpoint=EndpointSpec(method="POST", path="/secure", **endpoint),  # type: ignore[arg-type]
        auth_salt="00",
        auth_digest=bearer_digest("00", "sk-1"),
    )
    routes.table.put("secure", e)
    return TestClient(build_http(routes, invoker, Settings(max_body_bytes=1000, default_timeout_s=3)))


def test_401_names_the_scheme_and_never_reaches_a_replica(invoker: Invoker) -> None:
    with secured_client(invoker, auth_secret="API_KEY") as c:
        resp = c.post("/secure", json={})
        assert resp.status_code == 401 and resp.headers["www-authenticate"].startswith("Bearer")
        assert error_of(resp)["code"] == "unauthenticated"
        assert c.post("/secure", json={}, headers={"Authorization": "Bearer nope"}).status_code == 401
        assert invoker.calls == []
        assert c.post("/secure", json={}, headers={"Authorization": "Bearer sk-1"}).status_code == 200
        sent = msgspec.json.decode(invoker.calls[0][1].args)
        assert "authorization" not in sent["request"]["headers"]


def test_429_over_the_burst_limit_with_retry_after(invoker: Invoker) -> None:
    import asyncio

    import httpx

    gate = asyncio.Event()
    entered = asyncio.Event()

    class Slow(Invoker):
        async def invoke(
            self,
            subject: str,
            invocation: Invocation,
            timeout_s: float,
            trace_parent: Mapping[str, str] | None = None,
            *,
            direct: str = "",
        ) -> Result:
            entered.set()
            await gate.wait()
            return Result(call_id=invocation.call_id, ok=True, codec="json", value=b"1")

    routes = Routes()
    e = route("POST", "/b", "b")
    routes.table.put(
        "b", msgspec.structs.replace(e, endpoint=EndpointSpec(method="POST", path="/b", max_concurrency=1))
    )

    async def scenario() -> None:
        transport = httpx.ASGITransport(app=build_http(routes, Slow(), Settings()))
        async with httpx.AsyncClient(transport=transport, base_url="http://gw") as c:
            first = asyncio.ensure_future(c.post("/b", json={}))
            await entered.wait()
            resp = await c.post("/b", json={})
            assert resp.status_code == 429 and resp.headers["retry-after"] == "1"
            assert error_of(resp)["code"] == "rate_limited"
            gate.set()
            assert (await first).status_code == 200
            assert (await c.post("/b", json={})).status_code == 200

    asyncio.run(asyncio.wait_for(scenario(), 10))


def test_streamed_result_is_relayed_until_final(invoker: Invoker) -> None:
    def chunk(v: bytes, final: bool = False) -> Result:
        return Result(call_id="x", ok=True, stream=True, final=final, codec="json", value=v)

    invoker.answer = lambda inv: chunk(b'{"n":0}')
    invoker.more = [chunk(b'{"n":1}'), chunk(b"", final=True)]
    routes = Routes()
    routes.table.put("s", route("POST", "/s", "s"))
    with TestClient(build_http(routes, invoker, Settings())) as c:  # type: ignore[type-var]
        resp = c.post("/s", json={}, headers={"accept": "text/event-stream"})
        assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
        assert resp.content == b'data: {"n":0}\n\ndata: {"n":1}\n\n'
    assert invoker.closed == ["x"]


def test_stream_broken_mid_way_ends_with_an_error_event(invoker: Invoker) -> None:
    from duanflow_gateway.domain import BadGatewayError

    invoker.answer = lambda inv: Result(call_id="y", ok=True, stream=True, final=False, codec="bytes", value=b"a")
    invoker.more = [BadGatewayError("the replica stopped answering")]
    routes = Routes()
    routes.table.put("s", route("POST", "/s", "s"))
    with TestClient(build_http(routes, invoker, Settings())) as c:  # type: ignore[type-var]
        resp = c.post("/s", json={}, headers={"accept": "text/event-stream"})
        assert resp.content.startswith(b"data: a\n\nevent: error\ndata: ")
        assert b"bad_gateway" in resp.content


def test_readyz_and_openapi(invoker: Invoker) -> None:
    routes = Routes()
    routes.table.put("item", route("GET", "/items/{item_id}", "item"))
    ready = [False]
    with TestClient(build_http(routes, invoker, Settings(), ready=lambda: ready[0])) as c:  # type: ignore[type-var]
        assert c.get("/readyz").status_code == 503
        ready[0] = True
        assert c.get("/readyz").status_code == 200
        doc = c.get("/openapi.json").json()
        assert list(doc["paths"]) == ["/items/{item_id}"]

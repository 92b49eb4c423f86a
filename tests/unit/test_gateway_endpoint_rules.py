"""Pure rules of the endpoint path: bearer digests, burst limits, streaming frames, route conflicts, the OpenAPI
document, and the SDK side (``@app.endpoint`` options, ``df.Request``, ``df.Response``, result encoding)."""

from __future__ import annotations

import base64

import duanflow as df
import msgspec
import pytest
from duanflow._runtime.http_calls import encode_value
from duanflow_gateway import domain
from duanflow_gateway.openapi import openapi_document
from duanflow_proto.errors import InvalidInputError, UnauthenticatedError
from duanflow_proto.messages.invocation import Result
from duanflow_proto.messages.release import AppSpec, EndpointSpec, FunctionSpec, Release, RouteEntry, bearer_digest
from duanflow_router import domain as router_domain


def entry(auth: str | None = None, token: str | None = None, path: str = "/v1/x", app: str = "a") -> RouteEntry:
    salt = "ab" * 16
    return RouteEntry(
        method="POST",
        path=path,
        env="main",
        app=app,
        function="f",
        release="rel_1",
        subject="duanflow.inv.main.a.f",
        endpoint=EndpointSpec(method="POST", path=path, auth_secret=auth),
        auth_salt=salt if token else "",
        auth_digest=bearer_digest(salt, token) if token else "",
    )


# --------------------------------------------------------------------------- auth


def test_public_route_needs_no_token() -> None:
    domain.check_auth(entry(), None)


@pytest.mark.parametrize(
    "header",
    [None, "", "Bearer", "Bearer ", "Basic sk-1", "Bearer sk-2", "Bearer sk-1x", "bearer SK-1", "sk-1"],
)
def test_wrong_or_missing_token_is_401(header: str | None) -> None:
    with pytest.raises(UnauthenticatedError) as info:
        domain.check_auth(entry("API_KEY", "sk-1"), header)
    assert info.value.http_status == 401
    assert "sk-1" not in info.value.message


@pytest.mark.parametrize("header", ["Bearer sk-1", "bearer sk-1", "  Bearer   sk-1  "])
def test_right_token_passes(header: str) -> None:
    domain.check_auth(entry("API_KEY", "sk-1"), header)


def test_auth_route_without_digest_fails_closed() -> None:
    with pytest.raises(UnauthenticatedError):
        domain.check_auth(entry("API_KEY", None), "Bearer anything")


def test_route_entries_carry_a_salted_digest_never_the_token() -> None:
    ep = EndpointSpec(method="POST", path="/v1/chat", auth_secret="API_KEY")
    spec = AppSpec(
        name="a",
        module="m",
        env={"API_KEY": "sk-secret-value"},
        functions=[FunctionSpec(name="chat", kind="endpoint", endpoint=ep)],
    )
    release = Release(
        release_id="rel_1", app="a", env="main", created_ms=0, bundle_key="", bundle_digest="", image_id="", spec=spec
    )
    first = router_domain.route_entries(release)["main.a.chat"]
    second = router_domain.route_entries(release)["main.a.chat"]
    assert b"sk-secret-value" not in msgspec.json.encode(first)
    assert first.auth_salt != second.auth_salt and first.auth_digest != second.auth_digest
    domain.check_auth(first, "Bearer sk-secret-value")
    domain.check_auth(second, "Bearer sk-secret-value")


def test_empty_or_missing_token_value_is_refused_at_deploy() -> None:
    ep = EndpointSpec(method="POST", path="/v1/chat", auth_secret="API_KEY")
    fn = FunctionSpec(name="chat", kind="endpoint", endpoint=ep)
    assert router_domain.bearer_token_value(AppSpec(name="a", module="m", env={"API_KEY": ""}), fn) is None
    assert router_domain.bearer_token_value(AppSpec(name="a", module="m"), fn) is None
    fn_env = FunctionSpec(name="chat", kind="endpoint", endpoint=ep, env={"API_KEY": "k"})
    assert router_domain.bearer_token_value(AppSpec(name="a", module="m"), fn_env) == "k"


# --------------------------------------------------------------------------- route conflicts


def test_two_apps_claiming_one_route_conflict() -> None:
    existing = {"main.b.g": entry(path="/v1/items/{id}", app="b")}
    mine = AppSpec(
        name="a",
        module="m",
        functions=[
            FunctionSpec(name="f", kind="endpoint", endpoint=EndpointSpec(method="post", path="/v1/items/{item_id}"))
        ],
    )
    problems = router_domain.route_conflicts("main", mine, existing)
    assert len(problems) == 1 and "'b'" in problems[0]
    # the same app redeploying, another env, or another method: no conflict
    assert (
        router_domain.route_conflicts("main", AppSpec(name="b", module="m", functions=mine.functions), existing) == []
    )
    assert router_domain.route_conflicts("prod", mine, existing) == []
    get = FunctionSpec(name="f", kind="endpoint", endpoint=EndpointSpec(method="GET", path="/v1/items/{x}"))
    assert router_domain.route_conflicts("main", AppSpec(name="a", module="m", functions=[get]), existing) == []


def test_one_app_claiming_one_route_twice_conflicts() -> None:
    fns = [
        FunctionSpec(name=n, kind="endpoint", endpoint=EndpointSpec(method="GET", path=p))
        for n, p in (("f", "/a/{x}"), ("g", "/a/{y}"))
    ]
    assert len(router_domain.route_conflicts("main", AppSpec(name="a", module="m", functions=fns), {})) == 1


# --------------------------------------------------------------------------- burst limits


def test_burst_limit_counts_in_flight_requests() -> None:
    limits = domain.BurstLimits()
    limits.acquire("k", 2)
    limits.acquire("k", 2)
    with pytest.raises(domain.TooManyRequestsError) as info:
        limits.acquire("k", 2)
    assert info.value.http_status == 429
    limits.release("k")
    limits.acquire("k", 2)
    for _ in range(100):
        limits.acquire("unlimited", 0)
    limits.release("k")
    limits.release("k")
    assert "k" not in limits.in_flight


# --------------------------------------------------------------------------- bodies and streams


def test_request_body_rules() -> None:
    assert domain.parse_request_body(b'{"a":1}', "") == {"a": 1}
    assert domain.parse_request_body(b'{"a":1}', "application/json; charset=utf-8") == {"a": 1}
    with pytest.raises(InvalidInputError):
        domain.parse_request_body(b"{nope", "application/json")
    assert domain.parse_request_body(b"{nope", "text/plain") is None
    assert domain.parse_request_body(b"\x00\xff", "application/octet-stream") is None


def test_raw_body_travels_as_text_or_base64() -> None:
    args = msgspec.json.decode(domain.invocation_args("POST", "/", {}, [], [], None, b"hi"))
    assert args["request"]["body"] == "hi"
    args = msgspec.json.decode(domain.invocation_args("POST", "/", {}, [], [], None, b"\xff\x00"))
    assert base64.b64decode(args["request"]["body_b64"]) == b"\xff\x00"


def test_stream_frames() -> None:
    def chunk(value: bytes, codec: str = "bytes", final: bool = False) -> Result:
        return Result(call_id="c", ok=True, stream=True, value=value, codec=codec, final=final)

    assert domain.stream_chunk("sse", chunk(b'{"a":1}', "json")) == b'data: {"a":1}\n\n'
    assert domain.stream_chunk("sse", chunk(b"[DONE]")) == b"data: [DONE]\n\n"
    assert domain.stream_chunk("chunked", chunk(b'{"a":1}', "json")) == b'{"a":1}\n'
    assert domain.stream_chunk("chunked", chunk(b"raw")) == b"raw"
    assert domain.stream_chunk("sse", chunk(b"", final=True)) == b""
    assert domain.stream_error("sse", "boom", "it broke").startswith(b"event: error\ndata: ")
    assert domain.stream_error("chunked", "boom", "it broke") == b""


def test_stream_mode_choice() -> None:
    first = Result(call_id="c", ok=True, stream=True)
    assert domain.stream_mode(entry(), first, "") == "chunked"
    assert domain.stream_mode(entry(), first, "text/event-stream") == "sse"
    sse = msgspec.structs.replace(entry(), endpoint=EndpointSpec(stream="sse"))
    assert domain.stream_mode(sse, first, "") == "sse"
    own = Result(call_id="c", ok=True, stream=True, media_type="text/event-stream")
    assert domain.stream_mode(entry(), own, "") == "sse"


def test_replica_headers_cannot_break_framing() -> None:
    result = Result(
        call_id="c", ok=True, headers={"Content-Length": "9", "Transfer-Encoding": "x", "X-Ok": "1"}, media_type="a/b"
    )
    assert domain.safe_headers(result) == {"X-Ok": "1"}


def test_openapi_lists_deployed_routes() -> None:
    table = domain.RouteTable()
    table.put("main.a.f", entry("API_KEY", "sk", path="/v1/items/{item_id}"))
    doc = openapi_document(table)
    op = doc["paths"]["/v1/items/{item_id}"]["post"]
    assert op["parameters"] == [{"name": "item_id", "in": "path", "required": True, "schema": {"type": "string"}}]
    assert op["security"] == [{"bearer": []}] and "401" in op["responses"]
    assert "sk" not in msgspec.json.encode(doc).decode().replace("securitySchemes", "")


# --------------------------------------------------------------------------- SDK


def test_endpoint_decorator_builds_the_spec() -> None:
    app = df.App("ep-spec")

    @app.endpoint(
        method="POST",
        path="/v1/chat/completions",
        gpu="H100",
        keep_warm=1,
        auth=df.Auth.bearer("DUANFLOW_API_KEY"),
        burst=8,
        timeout=30,
    )
    def chat_completions(request: df.Request) -> dict[str, str]:
        return {}

    spec = chat_completions.spec
    assert spec.kind == "endpoint" and spec.keep_warm == 1 and spec.timeout_s == 30 and spec.gpu == ["H100"]
    assert spec.endpoint == EndpointSpec(
        method="POST", path="/v1/chat/completions", auth_secret="DUANFLOW_API_KEY", max_concurrency=8, stream="auto"
    )


@pytest.mark.parametrize(
    "options",
    [
        {"method": "FETCH"},
        {"path": "no-slash"},
        {"auth": "DUANFLOW_API_KEY"},
        {"burst": -1},
        {"stream": "websocket"},
        {"colour": "red"},
        {"burst": 2, "max_concurrency": 3},
    ],
)
def test_endpoint_options_are_checked_where_written(options: dict[str, object]) -> None:
    app = df.App("ep-bad")
    with pytest.raises(df.InvalidOptionError):
        app.endpoint(**options)  # type: ignore[arg-type]


def test_same_route_twice_in_one_app_is_refused() -> None:
    app = df.App("ep-twice")

    @app.endpoint(method="GET", path="/a/{x}")
    def one(request: df.Request) -> str:
        return ""

    with pytest.raises(df.InvalidOptionError):
        app.endpoint(method="GET", path="/a/{y}")


def test_request_object() -> None:
    req = df.Request.from_gateway(
        {
            "request": {
                "method": "POST",
                "path": "/v1/items/7",
                "path_params": {"item_id": "7"},
                "query": {"q": "x"},
                "headers": {"Content-Type": "application/json"},
                "body": '{"a": [1, 2]}',
            }
        }
    )
    assert (req.method, req.path, req.path_params, req.query) == ("POST", "/v1/items/7", {"item_id": "7"}, {"q": "x"})
    assert req.headers == {"content-type": "application/json"}
    assert req.json() == {"a": [1, 2]} and req.text() == '{"a": [1, 2]}' and req.body == b'{"a": [1, 2]}'
    binary = df.Request.from_gateway({"request": {"body_b64": base64.b64encode(b"\xff").decode()}})
    assert binary.body == b"\xff"
    with pytest.raises(df.InvalidInputError):
        binary.json()
    assert df.Request.from_gateway({}).json() is None


def test_response_checks_its_fields() -> None:
    r = df.Response(201, {"Location": "/x"}, {"id": 1})
    assert (r.status, r.headers, r.body) == (201, {"Location": "/x"}, {"id": 1})
    with pytest.raises(df.InvalidOptionError):
        df.Response(99)
    with pytest.raises(df.InvalidOptionError):
        df.Response(200, {"X": "a\r\nSet-Cookie: s=1"})


def test_return_values_encode_by_kind() -> None:
    assert encode_value({"a": 1}) == (b'{"a":1}', "json", "application/json")
    assert encode_value([1]) == (b"[1]", "json", "application/json")
    assert encode_value("héllo") == ("héllo".encode(), "bytes", "text/plain; charset=utf-8")
    assert encode_value(b"\x00") == (b"\x00", "bytes", "application/octet-stream")
    with pytest.raises(df.DeserializationError):
        encode_value(object())


def test_bearer_token_comes_from_the_app_env_or_the_deploying_shell(monkeypatch: pytest.MonkeyPatch) -> None:
    app = df.App("ep-token", env={"OTHER": "1"})

    @app.endpoint(method="GET", path="/t", auth=df.Auth.bearer("EP_TOKEN_TEST"))
    def t(request: df.Request) -> str:
        return ""

    monkeypatch.delenv("EP_TOKEN_TEST", raising=False)
    assert app.build_spec(module="m").functions[0].env == {}
    monkeypatch.setenv("EP_TOKEN_TEST", "sk-shell")
    assert app.build_spec(module="m").functions[0].env == {"EP_TOKEN_TEST": "sk-shell"}
    app2 = df.App("ep-token2", env={"EP_TOKEN_TEST": "sk-app"})

    @app2.endpoint(method="GET", path="/t", auth=df.Auth.bearer("EP_TOKEN_TEST"))
    def t2(request: df.Request) -> str:
        return ""

    assert app2.build_spec(module="m").functions[0].env == {}

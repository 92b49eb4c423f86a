"""The gateway's pure rules: route matching, HTTP → invocation arguments, result → HTTP reply."""

from __future__ import annotations

import msgspec
import pytest
from duanflow_gateway.domain import (
    MAX_INLINE_ARGS,
    BadGatewayError,
    RouteTable,
    check_inline,
    compile_route,
    http_reply,
    invocation_args,
    parse_body,
)
from duanflow_proto.errors import InvalidInputError, NotFoundError, PayloadTooLargeError, RemoteError
from duanflow_proto.messages.common import ErrorReply
from duanflow_proto.messages.invocation import Result
from duanflow_proto.messages.release import EndpointSpec, RouteEntry


def entry(method: str, path: str, function: str = "f", subject: str | None = None) -> RouteEntry:
    return RouteEntry(
        method=method,
        path=path,
        env="main",
        app="demo",
        function=function,
        release="rel_20260101_0000",
        subject=subject if subject is not None else f"duanflow.inv.main.demo.{function}",
        endpoint=EndpointSpec(method=method, path=path),
    )


@pytest.fixture
def table() -> RouteTable:
    t = RouteTable()
    t.put("root", entry("GET", "/", "root"))
    t.put("chat", entry("POST", "/v1/chat/completions", "chat"))
    t.put("item", entry("GET", "/items/{item_id}", "get_item"))
    t.put("item_new", entry("GET", "/items/new", "new_item"))
    t.put("item_put", entry("put", "/items/{item_id}", "put_item"))
    t.put("nested", entry("GET", "/users/{user}/posts/{post}", "post"))
    return t


@pytest.mark.parametrize(
    ("method", "path", "function", "params"),
    [
        ("GET", "/", "root", {}),
        ("POST", "/v1/chat/completions", "chat", {}),
        ("post", "/v1/chat/completions/", "chat", {}),  # method case and trailing slash do not matter
        ("POST", "//v1//chat/completions", "chat", {}),
        ("GET", "/items/42", "get_item", {"item_id": "42"}),
        ("GET", "/items/new", "new_item", {}),  # a literal segment beats a parameter
        ("PUT", "/items/new", "put_item", {"item_id": "new"}),
        ("GET", "/users/ada/posts/7", "post", {"user": "ada", "post": "7"}),
    ],
)
def test_match(table: RouteTable, method: str, path: str, function: str, params: dict[str, str]) -> None:
    found = table.match(method, path)
    assert found is not None
    assert found.entry.function == function
    assert found.path_params == params


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/v1/chat/completions"),  # wrong method
        ("POST", "/v1/chat"),
        ("GET", "/items"),
        ("GET", "/items/1/2"),
        ("DELETE", "/items/1"),
        ("GET", "/users/ada/posts"),
    ],
)
def test_no_match(table: RouteTable, method: str, path: str) -> None:
    assert table.match(method, path) is None


def test_resolve_names_the_accepted_methods(table: RouteTable) -> None:
    with pytest.raises(NotFoundError, match=r"no endpoint serves DELETE /items/1 \(it accepts GET, PUT\)") as exc:
        table.resolve("DELETE", "/items/1")
    assert exc.value.http_status == 404
    with pytest.raises(NotFoundError, match=r"no endpoint serves GET /nowhere$"):
        table.resolve("GET", "/nowhere")


def test_put_replaces_and_remove_forgets(table: RouteTable) -> None:
    table.put("chat", entry("POST", "/v2/chat", "chat"))
    assert table.match("POST", "/v1/chat/completions") is None
    assert table.match("POST", "/v2/chat") is not None
    table.remove("chat")
    table.remove("never-there")
    assert table.match("POST", "/v2/chat") is None


@pytest.mark.parametrize(
    ("bad", "why"),
    [
        (entry("GET", "items"), "must start with '/'"),
        (entry("GET", "/a/{x}/{x}"), "appears twice"),
        (entry("GET", "/a/{x-y}"), "is not"),
        (entry("GET", "/a/b{x}"), "is not"),
        (entry("G ET", "/a"), "bad HTTP method"),
        (entry("GET", "/a", subject="duanflow.api.release.deploy"), "not an invocation subject"),
    ],
)
def test_unusable_entries_are_refused(bad: RouteEntry, why: str) -> None:
    table = RouteTable()
    with pytest.raises(InvalidInputError, match=why):
        table.put("k", bad)
    assert len(table) == 0


def test_compile_route_segments() -> None:
    route = compile_route("k", entry("get", "/a/{b}/c"))
    assert route.method == "GET"
    assert route.segments == ("a", None, "c")
    assert route.params == ("b",)


@pytest.mark.parametrize(
    ("body", "value"),
    [(b"", None), (b"  \n", None), (b'{"a": 1}', {"a": 1}), (b"[1, 2]", [1, 2]), (b'"hi"', "hi"), (b"3", 3)],
)
def test_parse_body(body: bytes, value: object) -> None:
    assert parse_body(body) == value


@pytest.mark.parametrize("body", [b"{", b"{'a': 1}", b"nope", b"\xff\xfe"])
def test_parse_body_refuses_malformed_json(body: bytes) -> None:
    with pytest.raises(InvalidInputError, match="not valid JSON") as exc:
        parse_body(body)
    assert exc.value.http_status == 400


def test_invocation_args_object_body_query_and_path_params() -> None:
    raw = invocation_args(
        "post",
        "/items/7",
        {"item_id": "7"},
        [("q", "x"), ("q", "y"), ("item_id", "from-query")],
        [("Authorization", "Bearer secret"), ("Cookie", "c=1"), ("X-Trace", "t1")],
        {"name": "ada", "item_id": "from-body"},
    )
    payload = msgspec.json.decode(raw)
    assert payload["args"] == []
    # path parameters win over body fields, which win over query parameters; the first query value is kept
    assert payload["kwargs"] == {"q": "x", "item_id": "7", "name": "ada"}
    assert payload["request"]["method"] == "POST"
    assert payload["request"]["path"] == "/items/7"
    assert payload["request"]["headers"] == {"x-trace": "t1"}  # credentials stay at the edge


@pytest.mark.parametrize("body", [[1, 2], "text", 5, False])
def test_invocation_args_other_bodies_are_one_positional_argument(body: object) -> None:
    payload = msgspec.json.decode(invocation_args("POST", "/", {}, [], [], body))
    assert payload["args"] == [body]
    assert payload["kwargs"] == {}


def test_check_inline() -> None:
    check_inline(b"x" * MAX_INLINE_ARGS)
    with pytest.raises(PayloadTooLargeError):
        check_inline(b"x" * (MAX_INLINE_ARGS + 1))


def ok(value: bytes, codec: str = "json") -> Result:
    return Result(call_id="fc-1", ok=True, value=value, codec=codec)


@pytest.mark.parametrize(
    ("result", "body", "media"),
    [
        (ok(b'{"a":1}'), b'{"a":1}', "application/json"),
        (ok(b"[1,2]"), b"[1,2]", "application/json"),
        (ok(b"null"), b"null", "application/json"),
        (ok(b"3.5"), b"3.5", "application/json"),
        (ok('"héllo"'.encode()), "héllo".encode(), "text/plain; charset=utf-8"),
        (ok(b"\x00\x01raw", codec="bytes"), b"\x00\x01raw", "application/octet-stream"),
    ],
)
def test_http_reply(result: Result, body: bytes, media: str) -> None:
    reply = http_reply(result)
    assert (reply.status, reply.body, reply.media_type) == (200, body, media)


@pytest.mark.parametrize(
    ("result", "match"),
    [
        (ok(b"\x80\x04K\x01.", codec="cloudpickle"), "'cloudpickle'-encoded"),
        (ok(b"x", codec="weird"), "'weird'-encoded"),
        (ok(b"{not json"), "malformed JSON"),
        (Result(call_id="fc-1", ok=True, codec="json", payload_ref="payloads/x"), "stored in S3"),
        (Result(call_id="fc-1", ok=False), "without an error"),
    ],
)
def test_http_reply_refuses_what_it_cannot_serve(result: Result, match: str) -> None:
    with pytest.raises(BadGatewayError, match=match) as exc:
        http_reply(result)
    assert exc.value.http_status == 502


def test_http_reply_raises_the_remote_error_without_unpickling() -> None:
    err = ErrorReply(
        code="remote_error", message="ValueError: bad", http_status=500, exc_pickle=b"\x80\x04garbage", traceback="tb"
    )
    with pytest.raises(RemoteError, match="ValueError: bad") as exc:
        http_reply(Result(call_id="fc-1", ok=False, error=err))
    assert exc.value.http_status == 500

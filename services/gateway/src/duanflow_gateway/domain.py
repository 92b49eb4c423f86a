"""The gateway's rules over plain data: the route table, HTTP request → invocation arguments, result → HTTP reply.

Pure: no transport imports. The gateway never unpickles anything: a result it cannot read as JSON, text or bytes
is refused with 502.
"""

from __future__ import annotations

import base64
import hmac
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import msgspec
from duanflow_proto import subjects
from duanflow_proto.errors import (
    DuanFlowError,
    InvalidInputError,
    NotFoundError,
    PayloadTooLargeError,
    UnauthenticatedError,
    from_reply,
)
from duanflow_proto.messages.invocation import CODEC_BYTES, CODEC_JSON, Result
from duanflow_proto.messages.logs import LogLine
from duanflow_proto.messages.release import RouteEntry, bearer_digest

_PARAM = re.compile(r"^\{([A-Za-z_][A-Za-z0-9_]*)\}$")
_INV_PREFIX = subjects.INV_ALL[:-1]  # "duanflow.inv."

# Request headers a replica never needs to see: credentials stay at the edge.
HIDDEN_HEADERS = frozenset({"authorization", "cookie", "proxy-authorization"})

MAX_INLINE_ARGS = 1024 * 1024
"""Largest encoded arguments that travel inside the invocation message (the stream takes 2 MiB messages)."""

MEDIA_JSON = "application/json"
MEDIA_TEXT = "text/plain; charset=utf-8"
MEDIA_BYTES = "application/octet-stream"


class BadGatewayError(DuanFlowError):
    """A replica answered with something the gateway cannot turn into an HTTP response (pickled, unknown codec)."""

    code = "bad_gateway"
    http_status = 502


class TooManyRequestsError(DuanFlowError):
    """The endpoint already runs as many requests as its burst limit allows."""

    code = "rate_limited"
    http_status = 429
    retryable = True


RETRY_AFTER_S = 1
"""``Retry-After`` of a 429: burst slots free up as fast as requests finish."""
AUTH_REALM = 'Bearer realm="duanflow"'
"""``WWW-Authenticate`` of a 401."""


@dataclass(frozen=True)
class Route:
    """One compiled entry of the route table."""

    key: str
    """Key of the entry in the routes bucket."""
    entry: RouteEntry
    """The entry itself."""
    method: str
    """Upper-case HTTP method."""
    segments: tuple[str | None, ...]
    """Literal path segments, ``None`` where a parameter goes."""
    params: tuple[str, ...]
    """Parameter names, in path order."""
    direct: str = ""
    """Core subject of the endpoint's warm replicas (``subjects.direct``), tried before the stream."""

    @property
    def specificity(self) -> tuple[int, ...]:
        """Sort key: literal segments beat parameters, left to right."""
        return tuple(0 if s is not None else 1 for s in self.segments)


@dataclass(frozen=True)
class Match:
    """A route matching one request, with the values of its path parameters."""

    route: Route
    path_params: dict[str, str]

    @property
    def entry(self) -> RouteEntry:
        """The matched route entry."""
        return self.route.entry


def split_path(path: str) -> tuple[str, ...]:
    """Path segments, ignoring leading, trailing and repeated slashes.

    >>> split_path("/v1//chat/completions/")
    ('v1', 'chat', 'completions')
    """
    return tuple(s for s in path.split("/") if s)


def compile_route(key: str, entry: RouteEntry) -> Route:
    """Compile one entry; raises :class:`InvalidInputError` when its path, method or subject is unusable."""
    method = entry.method.strip().upper()
    if not method.isalpha():
        raise InvalidInputError(f"route {key!r}: bad HTTP method {entry.method!r}")
    if not entry.path.startswith("/"):
        raise InvalidInputError(f"route {key!r}: path {entry.path!r} must start with '/'")
    if not entry.subject.startswith(_INV_PREFIX):
        raise InvalidInputError(f"route {key!r}: subject {entry.subject!r} is not an invocation subject")
    segments: list[str | None] = []
    params: list[str] = []
    for seg in split_path(entry.path):
        m = _PARAM.match(seg)
        if m:
            if m.group(1) in params:
                raise InvalidInputError(f"route {key!r}: parameter {m.group(1)!r} appears twice in {entry.path!r}")
            params.append(m.group(1))
            segments.append(None)
        elif "{" in seg or "}" in seg:
            raise InvalidInputError(f"route {key!r}: segment {seg!r} of {entry.path!r} is not '{{name}}' nor literal")
        else:
            segments.append(seg)
    try:
        direct = subjects.direct(entry.env, entry.app, entry.function)
    except ValueError as exc:
        raise InvalidInputError(f"route {key!r}: {exc}") from None
    return Route(key=key, entry=entry, method=method, segments=tuple(segments), params=tuple(params), direct=direct)


@dataclass
class RouteTable:
    """The gateway's view of every deployed endpoint, keyed as in the routes bucket."""

    routes: dict[str, Route] = field(default_factory=dict)
    _by_length: dict[int, list[Route]] | None = field(default=None, init=False, repr=False, compare=False)
    """Routes by number of segments, most specific first (rebuilt after a change, not per request)."""
    _exact: dict[tuple[str, tuple[str, ...]], Route] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )
    """Routes without parameters by (method, segments): the most specific there can be, found in one lookup."""

    def put(self, key: str, entry: RouteEntry) -> Route:
        """Add or replace one entry (raises :class:`InvalidInputError` for an unusable one, leaving the table)."""
        route = compile_route(key, entry)
        self.routes[key] = route
        self._by_length = None
        return route

    def remove(self, key: str) -> None:
        """Forget one entry (no error when absent)."""
        if self.routes.pop(key, None) is not None:
            self._by_length = None

    def __len__(self) -> int:
        return len(self.routes)

    def _index(self) -> dict[int, list[Route]]:
        by_length = self._by_length
        if by_length is None:
            by_length = {}
            self._exact = {}
            for route in sorted(self.routes.values(), key=lambda r: (r.specificity, r.key)):
                by_length.setdefault(len(route.segments), []).append(route)
                if not route.params:
                    self._exact.setdefault((route.method, route.segments), route)  # type: ignore[arg-type]
            self._by_length = by_length
        return by_length

    def _candidates(self, path: str, parts: tuple[str, ...] | None = None) -> Iterable[tuple[Route, dict[str, str]]]:
        if parts is None:
            parts = split_path(path)
        for route in self._index().get(len(parts), ()):
            values: dict[str, str] = {}
            names = iter(route.params)
            for want, got in zip(route.segments, parts, strict=True):
                if want is None:
                    values[next(names)] = got
                elif want != got:
                    break
            else:
                yield route, values

    def match(self, method: str, path: str) -> Match | None:
        """The most specific route for ``method`` and ``path``, or None."""
        method = method.upper()
        parts = split_path(path)
        self._index()
        exact = self._exact.get((method, parts))
        if exact is not None:
            return Match(route=exact, path_params={})
        for route, values in self._candidates(path, parts):
            if route.method == method:
                return Match(route=route, path_params=values)
        return None

    def resolve(self, method: str, path: str) -> Match:
        """Like :meth:`match`, raising :class:`NotFoundError` that names the methods the path does accept."""
        found = self.match(method, path)
        if found is not None:
            return found
        others = sorted({r.method for r, _ in self._candidates(path)})
        hint = f" (it accepts {', '.join(others)})" if others else ""
        raise NotFoundError(
            f"no endpoint serves {method.upper()} {path}{hint}",
            details={"method": method.upper(), "path": path},
        )


def parse_body(body: bytes) -> Any:
    """The JSON value of a request body (None when empty); :class:`InvalidInputError` when it is not JSON."""
    if not body.strip():
        return None
    try:
        return msgspec.json.decode(body)
    except msgspec.DecodeError as exc:
        raise InvalidInputError(f"the request body is not valid JSON: {exc}") from None


def invocation_args(
    method: str,
    path: str,
    path_params: Mapping[str, str],
    query: Iterable[tuple[str, str]],
    headers: Iterable[tuple[str, str]],
    body: Any,
    raw_body: bytes = b"",
) -> bytes:
    """The ``json``-codec arguments of one HTTP call.

    ``{"args": [...], "kwargs": {...}, "request": {...}}``: a JSON object body becomes keyword arguments, any other
    JSON body the one positional argument; query parameters and then path parameters are keyword arguments too
    (path parameters win). ``request`` describes the HTTP call (method, path, path params, query, headers without
    credentials, and the raw body as ``body`` text or, when it is not UTF-8, ``body_b64``) for functions that take
    the request itself.

    >>> invocation_args("POST", "/x/1", {"id": "1"}, [("q", "a")], [], {"n": 2})
    b'{"args":[],"kwargs":{"q":"a","n":2,"id":"1"},"request":{"method":"POST","path":"/x/1","path_params":{"id":"1"},"query":{"q":"a"},"headers":{}}}'
    """
    query_map: dict[str, str] = {}
    for k, v in query:
        query_map.setdefault(k, v)
    kwargs: dict[str, Any] = dict(query_map)
    args: list[Any] = []
    if isinstance(body, dict):
        kwargs.update(body)
    elif body is not None:
        args.append(body)
    kwargs.update(path_params)
    request = {
        "method": method.upper(),
        "path": path,
        "path_params": dict(path_params),
        "query": query_map,
        "headers": {k.lower(): v for k, v in headers if k.lower() not in HIDDEN_HEADERS},
    }
    if raw_body:
        try:
            request["body"] = raw_body.decode("utf-8")
        except UnicodeDecodeError:
            request["body_b64"] = base64.b64encode(raw_body).decode("ascii")
    return msgspec.json.encode({"args": args, "kwargs": kwargs, "request": request})


def check_inline(args: bytes) -> None:
    """Refuse arguments too large to travel inline (:class:`PayloadTooLargeError`, 413)."""
    if len(args) > MAX_INLINE_ARGS:
        raise PayloadTooLargeError(
            f"the request's arguments take {len(args)} bytes; endpoints accept up to {MAX_INLINE_ARGS} bytes",
            details={"size": str(len(args)), "limit": str(MAX_INLINE_ARGS)},
        )


@dataclass(frozen=True)
class HttpReply:
    """What the gateway writes back for one successful call."""

    body: bytes
    media_type: str
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)


def http_reply(result: Result) -> HttpReply:
    """Turn a replica's result into the HTTP answer, or raise the error it carries.

    dict / list / number / null → JSON, str → text, codec ``bytes`` → binary. A pickled or unknown result is
    refused (:class:`BadGatewayError`); the error's pickled exception is never read.
    """
    if not result.ok:
        if result.error is None:
            raise BadGatewayError(f"call {result.call_id} failed without an error")
        raise from_reply(result.error)
    if result.payload_ref:
        raise BadGatewayError(f"call {result.call_id} returned a result stored in S3; large results are not served yet")
    if result.media_type and result.codec in (CODEC_BYTES, CODEC_JSON):
        # An endpoint replica said what it sent: no need to look inside.
        return HttpReply(
            body=result.value, media_type=result.media_type, status=result.status or 200, headers=safe_headers(result)
        )
    if result.codec == CODEC_BYTES:
        return HttpReply(body=result.value, media_type=MEDIA_BYTES)
    if result.codec != CODEC_JSON:
        raise BadGatewayError(
            f"call {result.call_id} returned a {result.codec!r}-encoded result; endpoints must return JSON values, "
            "text or bytes"
        )
    try:
        value = msgspec.json.decode(result.value)
    except msgspec.DecodeError:
        raise BadGatewayError(f"call {result.call_id} returned malformed JSON") from None
    if isinstance(value, str):
        return HttpReply(body=value.encode(), media_type=MEDIA_TEXT)
    return HttpReply(body=result.value, media_type=MEDIA_JSON)


# Headers an endpoint may not set: the HTTP server frames the body itself.
_FRAMING_HEADERS = frozenset({"content-length", "transfer-encoding", "connection", "content-type"})


def safe_headers(result: Result) -> dict[str, str]:
    """The response headers a replica asked for, minus those that would break the framing of the response."""
    return {k: v for k, v in result.headers.items() if k.lower() not in _FRAMING_HEADERS}


def parse_request_body(body: bytes, content_type: str) -> Any:
    """The JSON value of a body whose content type is JSON or unset (400 when malformed); other bodies: None."""
    ctype = content_type.lower()
    if not ctype or "json" in ctype:
        return parse_body(body)
    if ctype.startswith(("text/", "application/x-www-form-urlencoded")):
        try:
            return parse_body(body)
        except InvalidInputError:
            return None
    return None


def bearer_token(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, or None.

    >>> bearer_token("Bearer abc"), bearer_token("basic abc"), bearer_token(None)
    ('abc', None, None)
    """
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        return None
    return token


def check_auth(entry: RouteEntry, authorization: str | None) -> None:
    """Refuse (401) a call to a bearer-auth endpoint without the right token; the comparison takes constant time.

    The entry carries only a salted digest of the expected token. An entry that asks for auth but carries no digest
    refuses every call: failing closed beats serving a route whose token is unknown.
    """
    secret = entry.endpoint.auth_secret
    if not secret:
        return
    token = bearer_token(authorization)
    if token is None:
        raise UnauthenticatedError(f"{entry.method} {entry.path} needs 'Authorization: Bearer <{secret}>'")
    expected = entry.auth_digest
    try:
        got = bearer_digest(entry.auth_salt, token) if expected else ""
    except ValueError:
        got = ""
    if not expected or not hmac.compare_digest(got, expected):
        raise UnauthenticatedError(f"the bearer token for {entry.method} {entry.path} is not valid")


@dataclass
class BurstLimits:
    """Requests in flight per route key, against each endpoint's ``max_concurrency`` (0: unlimited)."""

    in_flight: dict[str, int] = field(default_factory=dict)

    def acquire(self, key: str, limit: int) -> None:
        """Take a slot; :class:`TooManyRequestsError` (429) when the endpoint is at its limit."""
        n = self.in_flight.get(key, 0)
        if limit > 0 and n >= limit:
            raise TooManyRequestsError(
                f"this endpoint serves at most {limit} requests at once; retry in {RETRY_AFTER_S}s",
                details={"limit": str(limit)},
            )
        self.in_flight[key] = n + 1

    def release(self, key: str) -> None:
        """Give a slot back."""
        n = self.in_flight.get(key, 0) - 1
        if n > 0:
            self.in_flight[key] = n
        else:
            self.in_flight.pop(key, None)


MEDIA_SSE = "text/event-stream"
MEDIA_STREAM_TEXT = "text/plain; charset=utf-8"
MEDIA_NDJSON = "application/x-ndjson"


def stream_mode(entry: RouteEntry, first: Result, accept: str) -> str:
    """``sse`` or ``chunked``: the replica's media type wins, then the endpoint's setting, then the client's Accept."""
    if first.media_type:
        return "sse" if first.media_type.lower().startswith(MEDIA_SSE) else "chunked"
    if entry.endpoint.stream in ("sse", "chunked"):
        return entry.endpoint.stream
    return "sse" if MEDIA_SSE in accept.lower() else "chunked"


def stream_media_type(mode: str, first: Result) -> str:
    """Content type of a streamed response."""
    if first.media_type:
        return first.media_type
    if mode == "sse":
        return MEDIA_SSE
    return MEDIA_NDJSON if first.codec == CODEC_JSON else MEDIA_STREAM_TEXT


def stream_chunk(mode: str, result: Result) -> bytes:
    r"""The bytes one streamed chunk puts on the wire: an SSE event, or the chunk (JSON chunks one per line).

    >>> stream_chunk("sse", Result(call_id="c", ok=True, codec="bytes", value=b"a\nb"))
    b'data: a\ndata: b\n\n'
    """
    if not result.value and result.final:
        return b""
    if mode == "sse":
        lines = result.value.replace(b"\r\n", b"\n").split(b"\n")
        return b"".join(b"data: " + line + b"\n" for line in lines) + b"\n"
    if result.codec == CODEC_JSON:
        return result.value + b"\n"
    return result.value


def stream_error(mode: str, code: str, message: str) -> bytes:
    """How a failure after the response started is told: an SSE ``error`` event (chunked streams just stop)."""
    if mode != "sse":
        return b""
    return b"event: error\ndata: " + error_body(code, message) + b"\n\n"


def error_body(code: str, message: str) -> bytes:
    """The JSON body of every error answer: ``{"error": {"code", "message"}}``."""
    return msgspec.json.encode({"error": {"code": code, "message": message}})


REQUEST_LOG_SOURCE = "gateway"


def request_line(
    entry: RouteEntry, method: str, path: str, status: int, duration_ms: float, call_id: str, now_ms: int
) -> LogLine:
    """The ``request`` log line of one served call (method, path without query, status, latency; never a body).

    >>> from duanflow_proto.messages.release import EndpointSpec
    >>> e = RouteEntry(method="GET", path="/", env="main", app="a", function="f", release="r",
    ...                subject=subjects.invocation("main", "a", "f"), endpoint=EndpointSpec())
    >>> request_line(e, "get", "/", 200, 12.34, "fc-1", 0).message
    'GET / 200 12.3ms'
    """
    level = "error" if status >= 500 else "warning" if status >= 400 else "info"
    return LogLine(
        ts_ms=now_ms,
        env=entry.env,
        app=entry.app,
        kind="request",
        source=REQUEST_LOG_SOURCE,
        message=f"{method.upper()} {path} {status} {duration_ms:.1f}ms",
        level=level,
        release=entry.release,
        function=entry.function,
        invocation=call_id,
    )

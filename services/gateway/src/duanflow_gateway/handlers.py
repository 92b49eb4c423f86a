"""HTTP transport only: the ASGI app that hands requests to the domain and the invoker. No rules here.

Endpoint calls are served by :class:`GatewayHttp` in plain ASGI (the hot path: no framework routing, request or
response objects in the way); ``/healthz``, ``/readyz`` and ``/openapi.json`` by a small Litestar app. Every error
leaves as ``{"error": {"code", "message"}}`` with the error's HTTP status, built by :func:`error_parts` for both.
"""

from __future__ import annotations

import itertools
import logging
import os
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any
from urllib.parse import parse_qsl

from duanflow_proto.errors import DuanFlowError, InternalError, PayloadTooLargeError
from duanflow_proto.messages.invocation import CODEC_JSON, Invocation, Result
from duanflow_proto.messages.release import RouteEntry
from litestar import Litestar, Request, Response, get
from litestar.exceptions import HTTPException
from litestar.logging.config import LoggingConfig

from duanflow_gateway import domain
from duanflow_gateway.openapi import openapi_document
from duanflow_gateway.ports import Invoker, RequestLog, Routes
from duanflow_gateway.settings import Settings

log = logging.getLogger("duanflow.gateway.http")

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

SERVICE_PATHS = frozenset({"/healthz", "/readyz", "/openapi.json"})
"""Paths the gateway answers itself; every other path is an endpoint (or 404)."""

# Litestar raises its own HTTP exceptions for what happens before a service route runs (bad method...).
_HTTP_CODES = {400: "invalid_input", 404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}
_STREAM_HEADERS = [(b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no")]


class ClientGoneError(Exception):
    """The client disconnected before its request body arrived."""


def error_parts(exc: Exception, method: str = "", path: str = "") -> tuple[int, dict[str, str], bytes]:
    """The gateway's one mapping of errors to HTTP: ``(status, headers, JSON body)``."""
    headers: dict[str, str] = {}
    if isinstance(exc, DuanFlowError):
        status, code, message = exc.http_status, exc.code, exc.message
    elif isinstance(exc, HTTPException):
        status, code, message = exc.status_code, _HTTP_CODES.get(exc.status_code, "http_error"), exc.detail
    else:
        log.exception("%s %s failed", method, path, exc_info=exc)
        err = InternalError(f"the gateway failed: {type(exc).__name__}")
        status, code, message = err.http_status, err.code, err.message
    if status == 401:
        headers["WWW-Authenticate"] = domain.AUTH_REALM
    elif status == 429:
        headers["Retry-After"] = str(domain.RETRY_AFTER_S)
    if status >= 500:
        log.warning("%s %s → %d %s: %s", method, path, status, code, message)
    return status, headers, domain.error_body(code, message)


def error_response(request: Request[Any, Any, Any], exc: Exception) -> Response[bytes]:
    """Litestar's exception handler for the service routes, through :func:`error_parts`."""
    status, headers, body = error_parts(exc, request.method, request.scope.get("path", ""))
    return Response(content=body, status_code=status, media_type=domain.MEDIA_JSON, headers=headers)


def _service_app(routes: Routes, ready: Callable[[], bool] | None) -> Litestar:
    @get("/healthz", sync_to_thread=False, include_in_schema=False)
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @get("/readyz", sync_to_thread=False, include_in_schema=False)
    def readyz() -> Response[bytes]:
        if ready is not None and not ready():
            body = domain.error_body("unavailable", "the gateway has not loaded its route table or lost NATS")
            return Response(content=body, status_code=503, media_type=domain.MEDIA_JSON)
        return Response(content=b'{"status":"ready"}', media_type=domain.MEDIA_JSON)

    @get("/openapi.json", sync_to_thread=False, include_in_schema=False)
    def openapi() -> dict[str, Any]:
        return openapi_document(routes.table)

    return Litestar(
        route_handlers=[healthz, readyz, openapi],
        exception_handlers={Exception: error_response},
        openapi_config=None,
        logging_config=LoggingConfig(configure_root_logger=False, log_exceptions="never"),
    )


class GatewayHttp:
    """The gateway's ASGI app: every deployed endpoint, plus the service routes.

    Each call to an endpoint is logged to ``request_log`` (method, path, status, latency, call id; never a body).
    """

    def __init__(
        self,
        routes: Routes,
        invoker: Invoker,
        settings: Settings,
        request_log: RequestLog | None = None,
        ready: Callable[[], bool] | None = None,
    ) -> None:
        self.routes = routes
        self.invoker = invoker
        self.settings = settings
        self.request_log = request_log
        self.limits = domain.BurstLimits()
        self._id_prefix = os.urandom(8).hex()
        """Call ids are this random prefix and a counter: unique across gateways, no system call per request."""
        self._ids = itertools.count(1)
        self.service = _service_app(routes, ready)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in SERVICE_PATHS:
            await self.service(scope, receive, send)  # type: ignore[arg-type]
            return
        await self.dispatch(scope, receive, send)

    async def _log(self, entry: RouteEntry, method: str, path: str, status: int, started: float, call_id: str) -> None:
        if self.request_log is not None:
            elapsed_ms = (time.monotonic() - started) * 1000
            line = domain.request_line(entry, method, path, status, elapsed_ms, call_id, int(time.time() * 1000))
            await self.request_log.publish(line)

    async def dispatch(self, scope: Scope, receive: Receive, send: Send) -> None:
        """One endpoint call: route, auth, burst limit, body, invocation, answer (plain or streamed), log."""
        method: str = scope["method"]
        path: str = scope["path"]
        try:
            match = self.routes.table.resolve(method, path)
        except DuanFlowError as exc:
            await _send_error(send, exc, method, path)
            return
        entry = match.entry
        key = match.route.key
        call_id = f"fc-{self._id_prefix}{next(self._ids):x}"
        started = time.monotonic()
        try:
            self.limits.acquire(key, entry.endpoint.max_concurrency)
        except DuanFlowError as exc:
            await _send_error(send, exc, method, path)
            await self._log(entry, method, path, exc.http_status, started, call_id)
            return
        status = 500
        try:
            status = await self._call(scope, receive, send, match, call_id)
        except ClientGoneError:
            status = 499
        except Exception as exc:
            status = exc.http_status if isinstance(exc, DuanFlowError) else 500
            try:
                await _send_error(send, exc, method, path)
            except Exception as late:  # the response had started, or the client is gone: nothing more to say
                log.debug("could not send the error of %s %s: %r", method, path, late)
        finally:
            self.limits.release(key)
            await self._log(entry, method, path, status, started, call_id)

    async def _call(self, scope: Scope, receive: Receive, send: Send, match: domain.Match, call_id: str) -> int:
        entry = match.entry
        method: str = scope["method"]
        path: str = scope["path"]
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        domain.check_auth(entry, headers.get("authorization"))
        raw = await _read_body(receive, headers.get("content-length"), self.settings.max_body_bytes)
        value = domain.parse_request_body(raw, headers.get("content-type", ""))
        qs: bytes = scope.get("query_string", b"")
        query = parse_qsl(qs.decode("latin-1"), keep_blank_values=True) if qs else []
        args = domain.invocation_args(method, path, match.path_params, query, headers.items(), value, raw)
        domain.check_inline(args)
        timeout_s = entry.timeout_s if entry.timeout_s > 0 else self.settings.default_timeout_s
        invocation = Invocation(
            call_id=call_id,
            function=entry.function,
            args=args,
            codec=CODEC_JSON,
            deadline_ms=int((time.time() + timeout_s) * 1000),
        )
        # A W3C traceparent from the client: the invocation's trace continues it.
        trace_parent = headers if "traceparent" in headers else None
        result = await self.invoker.invoke(
            entry.subject, invocation, timeout_s, trace_parent, direct=match.route.direct
        )
        if result.stream:
            return await self._relay(send, entry, result, headers.get("accept", ""), method, path)
        reply = domain.http_reply(result)
        out = [(b"content-type", reply.media_type.encode("latin-1")), (b"content-length", b"%d" % len(reply.body))]
        out.extend((k.encode("latin-1"), v.encode("latin-1")) for k, v in reply.headers.items())
        await send({"type": "http.response.start", "status": reply.status, "headers": out})
        await send({"type": "http.response.body", "body": reply.body})
        return reply.status

    async def _relay(self, send: Send, entry: RouteEntry, first: Result, accept: str, method: str, path: str) -> int:
        """A streamed answer: chunks as the replica sends them, until its final message.

        A failure once the response has started cannot change its status: an SSE stream gets an ``error`` event,
        and the request log records the failure's status.
        """
        call_id = first.call_id
        try:
            if not first.ok:
                domain.http_reply(first)  # raises the replica's error: nothing was sent yet
            mode = domain.stream_mode(entry, first, accept)
            status = first.status or 200
            out = [(b"content-type", domain.stream_media_type(mode, first).encode("latin-1")), *_STREAM_HEADERS]
            out.extend((k.encode("latin-1"), v.encode("latin-1")) for k, v in domain.safe_headers(first).items())
            await send({"type": "http.response.start", "status": status, "headers": out})
            result = first
            while True:
                if not result.ok:
                    err = result.error
                    code, message = (err.code, err.message) if err is not None else ("bad_gateway", "the call failed")
                    status = err.http_status if err is not None and err.http_status else 502
                    await _send_chunk(send, domain.stream_error(mode, code, message))
                    break
                await _send_chunk(send, domain.stream_chunk(mode, result))
                if result.final:
                    break
                try:
                    result = await self.invoker.next(call_id)
                except DuanFlowError as exc:
                    status = exc.http_status
                    log.warning("stream %s %s broke: %s", method, path, exc.message)
                    await _send_chunk(send, domain.stream_error(mode, exc.code, exc.message))
                    break
            await send({"type": "http.response.body", "body": b""})
            return status
        finally:
            self.invoker.close(call_id)


async def _send_chunk(send: Send, chunk: bytes) -> None:
    if chunk:
        await send({"type": "http.response.body", "body": chunk, "more_body": True})


async def _send_error(send: Send, exc: Exception, method: str, path: str) -> None:
    status, headers, body = error_parts(exc, method, path)
    out = [(b"content-type", domain.MEDIA_JSON.encode()), (b"content-length", b"%d" % len(body))]
    out.extend((k.encode("latin-1"), v.encode("latin-1")) for k, v in headers.items())
    await send({"type": "http.response.start", "status": status, "headers": out})
    await send({"type": "http.response.body", "body": body})


async def _read_body(receive: Receive, content_length: str | None, limit: int) -> bytes:
    """The whole request body, refusing (413) one over ``limit`` bytes before reading it when the length says so."""

    def too_large() -> PayloadTooLargeError:
        return PayloadTooLargeError(
            f"the request body is over the gateway's limit of {limit} bytes", details={"limit": str(limit)}
        )

    if content_length is not None and content_length.isdigit() and int(content_length) > limit:
        raise too_large()
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGoneError
        body: bytes = message.get("body", b"")
        size += len(body)
        if size > limit:
            raise too_large()
        chunks.append(body)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def build_http(
    routes: Routes,
    invoker: Invoker,
    settings: Settings,
    request_log: RequestLog | None = None,
    ready: Callable[[], bool] | None = None,
) -> GatewayHttp:
    """The gateway's ASGI app: ``/healthz``, ``/readyz``, ``/openapi.json`` and every deployed endpoint."""
    return GatewayHttp(routes, invoker, settings, request_log, ready)

"""HTTP transport only: Litestar routes that hand requests to the domain and the invoker. No rules here.

Every error leaves through the one exception handler, as ``{"error": {"code", "message"}}`` with the error's
HTTP status.
"""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any
from urllib.parse import parse_qsl

from duanflow_proto.errors import DuanFlowError, InternalError
from duanflow_proto.messages.invocation import CODEC_JSON, Invocation
from litestar import Litestar, Request, Response, get, route
from litestar.enums import HttpMethod
from litestar.exceptions import HTTPException
from litestar.logging.config import LoggingConfig

from duanflow_gateway import domain
from duanflow_gateway.ports import Invoker, RequestLog, Routes
from duanflow_gateway.settings import Settings

log = logging.getLogger("duanflow.gateway.http")

METHODS = [HttpMethod.GET, HttpMethod.POST, HttpMethod.PUT, HttpMethod.PATCH, HttpMethod.DELETE]

# Litestar raises its own HTTP exceptions for what happens before our handler runs (oversized body, bad method).
_HTTP_CODES = {400: "invalid_input", 404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}


def error_response(request: Request[Any, Any, Any], exc: Exception) -> Response[bytes]:
    """The gateway's single exception handler: any error → its HTTP status and JSON error body."""
    if isinstance(exc, DuanFlowError):
        status, code, message = exc.http_status, exc.code, exc.message
    elif isinstance(exc, HTTPException):
        status, code, message = exc.status_code, _HTTP_CODES.get(exc.status_code, "http_error"), exc.detail
        if status == 413:
            limit = request.route_handler.resolve_request_max_body_size()
            message = f"the request body is over the gateway's limit of {limit} bytes"
    else:
        log.exception("%s %s failed", request.method, request.scope.get("path", ""), exc_info=exc)
        err = InternalError(f"the gateway failed: {type(exc).__name__}")
        status, code, message = err.http_status, err.code, err.message
    if status >= 500:
        log.warning("%s %s → %d %s: %s", request.method, request.scope.get("path", ""), status, code, message)
    return Response(content=domain.error_body(code, message), status_code=status, media_type=domain.MEDIA_JSON)


def build_http(routes: Routes, invoker: Invoker, settings: Settings, request_log: RequestLog | None = None) -> Litestar:
    """The gateway's ASGI app: ``GET /healthz`` and every deployed endpoint (each call logged to ``request_log``)."""

    @get("/healthz", sync_to_thread=False)
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @route(["/", "/{path:path}"], http_method=METHODS, include_in_schema=False)
    async def dispatch(request: Request[Any, Any, Any]) -> Response[bytes]:
        path: str = request.scope["path"]
        match = routes.table.resolve(request.method, path)
        entry = match.entry
        call_id = f"fc-{uuid.uuid4().hex}"
        started = time.monotonic()
        status = 500
        try:
            value = domain.parse_body(await request.body())
            args = domain.invocation_args(
                request.method,
                path,
                match.path_params,
                parse_qsl(request.scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True),
                [(k.decode("latin-1"), v.decode("latin-1")) for k, v in request.scope["headers"]],
                value,
            )
            domain.check_inline(args)
            timeout_s = entry.timeout_s if entry.timeout_s > 0 else settings.default_timeout_s
            invocation = Invocation(
                call_id=call_id,
                function=entry.function,
                args=args,
                codec=CODEC_JSON,
                deadline_ms=int((time.time() + timeout_s) * 1000),
            )
            result = await invoker.invoke(entry.subject, invocation, timeout_s)
            reply = domain.http_reply(result)
            status = reply.status
            return Response(content=reply.body, status_code=reply.status, media_type=reply.media_type)
        except DuanFlowError as exc:
            status = exc.http_status
            raise
        except HTTPException as exc:
            status = exc.status_code
            raise
        finally:
            if request_log is not None:
                elapsed_ms = (time.monotonic() - started) * 1000
                line = domain.request_line(
                    entry, request.method, path, status, elapsed_ms, call_id, int(time.time() * 1000)
                )
                await request_log.publish(line)

    return Litestar(
        route_handlers=[healthz, dispatch],
        exception_handlers={Exception: error_response},
        request_max_body_size=settings.max_body_bytes,
        openapi_config=None,
        logging_config=LoggingConfig(configure_root_logger=False, log_exceptions="never"),
    )

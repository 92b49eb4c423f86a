"""The one request/reply handler shape: decode → call the domain → encode, errors as ``ErrorReply``.

Garbage on any subject gets a typed ``invalid_input`` reply and the service keeps serving.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import msgspec
from duanflow_proto import codec
from duanflow_proto.errors import DuanFlowError, InternalError

log = logging.getLogger("duanflow.handlers")

Req = TypeVar("Req")

MAX_REQUEST_BYTES = 1024 * 1024


def encode_error(exc: BaseException) -> bytes:
    """Encode any exception as an ``ErrorReply``."""
    err = exc if isinstance(exc, DuanFlowError) else InternalError(f"{type(exc).__name__}: {exc}")
    return codec.encode(err.to_reply())


async def handle(
    data: bytes, req_type: type[Req], fn: Callable[[Req], Awaitable[msgspec.Struct]], *, subject: str = ""
) -> bytes:
    """Decode ``data`` as ``req_type``, run ``fn``, and encode its answer or error."""
    try:
        if len(data) > MAX_REQUEST_BYTES:
            from duanflow_proto.errors import PayloadTooLargeError

            raise PayloadTooLargeError(f"request of {len(data)} bytes is over the {MAX_REQUEST_BYTES} byte limit")
        req = codec.decode(data, req_type)
        reply = await fn(req)
        return codec.encode(reply)
    except DuanFlowError as exc:
        log.warning("request on %s refused: %s: %s", subject, exc.code, exc.message)
        return encode_error(exc)
    except Exception as exc:
        log.exception("request on %s failed", subject)
        return encode_error(exc)


def decode_reply(data: bytes, reply_type: type[Any]) -> Any:
    """Decode a reply that is either ``reply_type`` or an ``ErrorReply`` (raised as its class)."""
    from duanflow_proto.errors import from_reply
    from duanflow_proto.messages import ErrorReply

    msg = codec.decode(data, reply_type | ErrorReply)  # type: ignore[arg-type]
    if isinstance(msg, ErrorReply):
        raise from_reply(msg)
    return msg

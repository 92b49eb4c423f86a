"""Arguments and results too large for one message (over ``INLINE_MAX``) travel through S3.

The router hands out presigned URLs (``subjects.API_PAYLOAD_URL``); callers and replicas never hold S3 keys.
Payloads are content-addressed by their sha256 digest, which is all an invocation or a result carries
(``payload_ref``): only a party that already knows the digest can ask for the URL, the same bytes are stored
once, and the receiver checks what it downloaded against the digest.
"""

from __future__ import annotations

import asyncio
import hashlib
import urllib.request
from typing import Any, Final

from duanflow_proto import codec, subjects
from duanflow_proto.errors import DeserializationError, UnavailableError, from_reply
from duanflow_proto.messages.common import ErrorReply
from duanflow_proto.messages.invocation import PayloadUrlReply, PayloadUrlRequest

INLINE_MAX: Final = 960 * 1024
"""Serialized arguments or results above this go through S3 (a NATS message carries 1 MiB)."""
URL_TIMEOUT_S: Final = 30.0
TRANSFER_TIMEOUT_S: Final = 600.0


async def _url(nc: Any, request: PayloadUrlRequest) -> PayloadUrlReply:
    try:
        msg = await nc.request(subjects.API_PAYLOAD_URL, codec.encode(request), timeout=URL_TIMEOUT_S)
    except Exception as exc:
        raise UnavailableError(
            f"large payloads need the router (no presigned URL from {subjects.API_PAYLOAD_URL}: "
            f"{type(exc).__name__} {exc})"
        ) from None
    reply: Any = codec.decode(msg.data, PayloadUrlReply | ErrorReply)  # type: ignore[arg-type]
    if isinstance(reply, ErrorReply):
        raise from_reply(reply)
    return reply  # type: ignore[no-any-return]


async def store(nc: Any, data: bytes) -> str:
    """Upload ``data`` (unless stored already); its digest, for ``payload_ref``."""
    digest = hashlib.sha256(data).hexdigest()
    reply = await _url(nc, PayloadUrlRequest(digest=digest, size=len(data), upload=True))
    if not reply.exists:
        await asyncio.to_thread(_put, reply.url, data)
    return digest


async def fetch(nc: Any, digest: str) -> bytes:
    """Download the payload named by ``digest`` and check it."""
    reply = await _url(nc, PayloadUrlRequest(digest=digest))
    data = await asyncio.to_thread(_get, reply.url)
    if hashlib.sha256(data).hexdigest() != digest:
        raise DeserializationError(f"the payload {digest} downloaded from S3 does not match its digest")
    return data


def _put(url: str, data: bytes) -> None:
    req = urllib.request.Request(url, data=data, method="PUT")  # noqa: S310 - a presigned http(s) URL
    with urllib.request.urlopen(req, timeout=TRANSFER_TIMEOUT_S) as resp:  # noqa: S310
        resp.read()


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=TRANSFER_TIMEOUT_S) as resp:  # noqa: S310 - a presigned http(s) URL
        data: bytes = resp.read()
    return data

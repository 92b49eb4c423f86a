"""``df.storage``: read and write objects at ``s3://bucket/key`` URLs (the stack's bucket by default).

The router hands out presigned URLs (``subjects.API_STORAGE_URL``); clients and replicas never hold S3 keys.
A URL may also be a bare key (``"results/1.json"``): the stack's bucket. Keys under the platform's own prefixes
(``bundles/``, ``payloads/``, ``images/``, ``logs/``) are refused.

Example::

    df.storage.write_json("s3://duanflow/transcripts/1.json", {"text": "hello"})
    df.storage.read_json("s3://duanflow/transcripts/1.json")   # {'text': 'hello'}
    df.storage.list("s3://duanflow/transcripts/")              # ['s3://duanflow/transcripts/1.json']
"""

from __future__ import annotations

import builtins
import json
import urllib.error
import urllib.request
from typing import Any, Final

from duanflow_proto import subjects
from duanflow_proto.messages.queue import StorageReply, StorageRequest

from duanflow._errors import InvalidInputError, UnavailableError

SCHEME: Final = "s3://"
TRANSFER_TIMEOUT_S: Final = 120.0


def parse_url(url: str) -> tuple[str, str]:
    """``(bucket, key)`` of ``s3://bucket/key``; a bare key gives bucket ``""`` (the stack's).

    >>> parse_url("s3://duanflow/a/b.json")
    ('duanflow', 'a/b.json')
    >>> parse_url("a/b.json")
    ('', 'a/b.json')
    """
    if not isinstance(url, str):
        raise InvalidInputError(f"a storage URL is a str like 's3://bucket/key', got {url!r}")
    if url.startswith(SCHEME):
        bucket, _, key = url[len(SCHEME) :].partition("/")
        if not bucket:
            raise InvalidInputError(f"{url!r} names no bucket: use s3://bucket/key")
        return bucket, key
    if "://" in url:
        raise InvalidInputError(f"{url!r} is not an s3:// URL")
    return "", url.lstrip("/")


def _ask(subject: str, req: StorageRequest) -> StorageReply:
    from duanflow._client import get_client

    client = get_client()

    async def ask() -> StorageReply:
        return await client.request(subject, req, StorageReply)

    return client.run(ask)


def _url(url: str, op: str) -> StorageReply:
    bucket, key = parse_url(url)
    if not key or key.endswith("/"):
        raise InvalidInputError(f"{url!r} names no object key")
    return _ask(subjects.API_STORAGE_URL, StorageRequest(key=key, bucket=bucket, op=op))


def _transfer(req: urllib.request.Request | str, what: str) -> bytes:
    try:
        with urllib.request.urlopen(req, timeout=TRANSFER_TIMEOUT_S) as resp:  # noqa: S310 - a presigned http(s) URL
            return resp.read()  # type: ignore[no-any-return]
    except (urllib.error.URLError, OSError) as exc:
        raise UnavailableError(f"object storage unreachable while {what}: {exc}") from None


def write_bytes(url: str, data: bytes) -> str:
    """Store ``data`` at ``url``; returns the object's ``s3://bucket/key`` URL."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise InvalidInputError(f"write_bytes takes bytes, got {type(data).__name__}")
    reply = _url(url, "put")
    req = urllib.request.Request(reply.url, data=bytes(data), method="PUT")  # noqa: S310
    _transfer(req, f"writing {url}")
    return f"{SCHEME}{reply.bucket}/{parse_url(url)[1]}"


def read_bytes(url: str) -> bytes:
    """The object at ``url`` (:class:`~duanflow.NotFoundError` when there is none)."""
    return _transfer(_url(url, "get").url, f"reading {url}")


def write_json(url: str, obj: Any) -> str:
    """Store ``obj`` as JSON (UTF-8) at ``url``; returns the object's ``s3://bucket/key`` URL."""
    return write_bytes(url, json.dumps(obj, ensure_ascii=False).encode())


def read_json(url: str) -> Any:
    """The JSON object at ``url``."""
    return json.loads(read_bytes(url))


def exists(url: str) -> bool:
    """Whether an object is stored at ``url``."""
    return _url(url, "head").exists


def list(prefix: str = "") -> builtins.list[str]:
    """``s3://bucket/key`` URLs of the objects under ``prefix`` (recursive, sorted, at most 10,000)."""
    bucket, key = parse_url(prefix)
    reply = _ask(subjects.API_STORAGE_LIST, StorageRequest(key=key, bucket=bucket, limit=10_000))
    return [f"{SCHEME}{reply.bucket}/{k}" for k in reply.keys]


__all__ = ["exists", "list", "parse_url", "read_bytes", "read_json", "write_bytes", "write_json"]

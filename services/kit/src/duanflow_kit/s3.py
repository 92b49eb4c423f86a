"""The S3 client every service builds the same way (MinIO client, any S3 server; blocking calls go in threads)."""

from __future__ import annotations

import asyncio
from urllib.parse import urlsplit

from minio import Minio
from minio.error import S3Error

DEFAULT_REGION = "us-east-1"
"""Fixed so presigning never looks the region up at an endpoint that may be unreachable from here."""

MISSING_CODES = frozenset({"NoSuchKey", "NoSuchObject", "NotFound", "NoSuchBucket"})
"""S3 error codes that mean "not there"."""


def endpoint(value: str, secure: bool) -> tuple[str, bool]:
    """``host:port`` and TLS flag from ``host:port`` or ``http(s)://host:port``.

    >>> endpoint("https://s3.example:9000", False), endpoint("127.0.0.1:9000", False)
    (('s3.example:9000', True), ('127.0.0.1:9000', False))
    """
    if "://" in value:
        parts = urlsplit(value)
        return parts.netloc, parts.scheme == "https"
    return value, secure


def client(url: str, access_key: str, secret_key: str, *, secure: bool = False) -> Minio:
    """A MinIO client for ``url`` (``host:port`` or ``http(s)://host:port``)."""
    host, tls = endpoint(url, secure)
    return Minio(host, access_key=access_key, secret_key=secret_key, secure=tls, region=DEFAULT_REGION)


async def ensure_bucket(s3: Minio, bucket: str) -> None:
    """Create ``bucket`` when missing; another service creating it at the same moment is fine."""

    def run() -> None:
        if not s3.bucket_exists(bucket):
            try:
                s3.make_bucket(bucket)
            except S3Error as exc:
                if exc.code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                    raise

    await asyncio.to_thread(run)

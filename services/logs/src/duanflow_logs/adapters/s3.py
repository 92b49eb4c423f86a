"""Archive objects in S3 (MinIO client; blocking calls run in a thread)."""

from __future__ import annotations

import asyncio
import io
from urllib.parse import urlsplit

from minio import Minio
from minio.error import S3Error

DEFAULT_REGION = "us-east-1"


def _endpoint(value: str, secure: bool) -> tuple[str, bool]:
    """``host:port`` and TLS flag from ``host:port`` or ``http(s)://host:port``."""
    if "://" in value:
        parts = urlsplit(value)
        return parts.netloc, parts.scheme == "https"
    return value, secure


class S3Archive:
    """:class:`duanflow_logs.ports.ArchiveStore` on one S3 bucket."""

    def __init__(self, endpoint: str, access_key: str, secret_key: str, bucket: str, *, secure: bool = False) -> None:
        host, tls = _endpoint(endpoint, secure)
        self._client = Minio(host, access_key=access_key, secret_key=secret_key, secure=tls, region=DEFAULT_REGION)
        self._bucket = bucket

    async def ensure_bucket(self) -> None:
        """Create the bucket when missing (another service may be creating it at the same moment)."""

        def run() -> None:
            if not self._client.bucket_exists(self._bucket):
                try:
                    self._client.make_bucket(self._bucket)
                except S3Error as exc:
                    if exc.code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                        raise

        await asyncio.to_thread(run)

    async def put(self, key: str, data: bytes) -> None:
        """Store ``data`` under ``key``."""
        await asyncio.to_thread(
            self._client.put_object, self._bucket, key, io.BytesIO(data), len(data), content_type="application/gzip"
        )

    async def get(self, key: str) -> bytes:
        """The object under ``key``."""

        def run() -> bytes:
            resp = self._client.get_object(self._bucket, key)
            try:
                return bytes(resp.read())
            finally:
                resp.close()
                resp.release_conn()

        return await asyncio.to_thread(run)

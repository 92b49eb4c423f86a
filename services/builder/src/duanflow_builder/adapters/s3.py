"""Image artifacts in S3 (MinIO client; blocking calls run in a thread)."""

from __future__ import annotations

import asyncio
from pathlib import Path
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


class S3Artifacts:
    """:class:`duanflow_builder.ports.ArtifactStore` on one S3 bucket."""

    def __init__(self, endpoint: str, access_key: str, secret_key: str, bucket: str, *, secure: bool = False) -> None:
        host, tls = _endpoint(endpoint, secure)
        self._client = Minio(host, access_key=access_key, secret_key=secret_key, secure=tls, region=DEFAULT_REGION)
        self._bucket = bucket

    async def ensure_bucket(self) -> None:
        """Create the bucket when missing (the router may be creating it at the same moment)."""

        def run() -> None:
            if not self._client.bucket_exists(self._bucket):
                try:
                    self._client.make_bucket(self._bucket)
                except S3Error as exc:
                    if exc.code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                        raise

        await asyncio.to_thread(run)

    async def upload(self, key: str, path: Path) -> None:
        """Store the file at ``path`` under ``key``."""
        await asyncio.to_thread(self._client.fput_object, self._bucket, key, str(path), content_type="application/gzip")

    async def exists(self, key: str) -> bool:
        """Whether ``key`` is stored."""

        def run() -> bool:
            try:
                self._client.stat_object(self._bucket, key)
            except S3Error as exc:
                if exc.code in ("NoSuchKey", "NoSuchObject", "NotFound", "NoSuchBucket"):
                    return False
                raise
            return True

        return await asyncio.to_thread(run)

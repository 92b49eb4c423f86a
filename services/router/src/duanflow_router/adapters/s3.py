"""The blob store on any S3 server (minio client; blocking calls run in threads)."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from urllib.parse import urlsplit

from minio import Minio
from minio.error import S3Error

# Presigning against the public endpoint must not look the region up there: it may be unreachable from here.
DEFAULT_REGION = "us-east-1"
_MISSING = {"NoSuchKey", "NoSuchObject", "NotFound", "NoSuchBucket"}


def _endpoint(value: str, secure: bool) -> tuple[str, bool]:
    """``host:port`` and TLS flag from ``host:port`` or ``http(s)://host:port``."""
    if "://" in value:
        parts = urlsplit(value)
        return parts.netloc, parts.scheme == "https"
    return value, secure


class S3BlobStore:
    """:class:`duanflow_router.ports.BlobStore` on one bucket."""

    def __init__(
        self,
        endpoint: str,
        access_key: str,
        secret_key: str,
        bucket: str,
        *,
        secure: bool = False,
        public_endpoint: str = "",
    ) -> None:
        host, tls = _endpoint(endpoint, secure)
        self.bucket = bucket
        self.client = Minio(host, access_key=access_key, secret_key=secret_key, secure=tls, region=DEFAULT_REGION)
        if public_endpoint:
            phost, ptls = _endpoint(public_endpoint, secure)
            self.public = Minio(phost, access_key=access_key, secret_key=secret_key, secure=ptls, region=DEFAULT_REGION)
        else:
            self.public = self.client

    async def ensure_bucket(self) -> None:
        """Create the bucket when it does not exist."""

        def run() -> None:
            if not self.client.bucket_exists(self.bucket):
                try:
                    self.client.make_bucket(self.bucket)
                except S3Error as exc:
                    if exc.code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                        raise

        await asyncio.to_thread(run)

    async def exists(self, key: str) -> bool:
        """Whether ``key`` is stored."""

        def run() -> bool:
            try:
                self.client.stat_object(self.bucket, key)
            except S3Error as exc:
                if exc.code in _MISSING:
                    return False
                raise
            return True

        return await asyncio.to_thread(run)

    async def presign_put(self, key: str, expires_s: int) -> str:
        """A PUT URL for clients (signed for the public endpoint when one is set)."""
        return await asyncio.to_thread(
            self.public.presigned_put_object, self.bucket, key, expires=timedelta(seconds=expires_s)
        )

    async def presign_get(self, key: str, expires_s: int) -> str:
        """A GET URL for agents (inside the stack: the internal endpoint)."""
        return await asyncio.to_thread(
            self.client.presigned_get_object, self.bucket, key, expires=timedelta(seconds=expires_s)
        )

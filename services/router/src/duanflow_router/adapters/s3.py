"""The blob store on any S3 server (minio client; blocking calls run in threads)."""

from __future__ import annotations

import asyncio
from datetime import timedelta

from duanflow_kit import s3
from minio.error import S3Error

_MISSING = s3.MISSING_CODES


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
        self.bucket = bucket
        self.client = s3.client(endpoint, access_key, secret_key, secure=secure)
        if public_endpoint:
            # URLs handed to agents and clients are presigned against the endpoint they can reach
            self.public = s3.client(public_endpoint, access_key, secret_key, secure=secure)
        else:
            self.public = self.client

    async def ensure_bucket(self) -> None:
        """Create the bucket when it does not exist."""
        await s3.ensure_bucket(self.client, self.bucket)

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

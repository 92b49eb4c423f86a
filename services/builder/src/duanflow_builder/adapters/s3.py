"""Image artifacts in S3 (MinIO client; blocking calls run in a thread)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from duanflow_kit import s3
from minio.error import S3Error


class S3Artifacts:
    """:class:`duanflow_builder.ports.ArtifactStore` on one S3 bucket."""

    def __init__(self, endpoint: str, access_key: str, secret_key: str, bucket: str, *, secure: bool = False) -> None:
        self._client = s3.client(endpoint, access_key, secret_key, secure=secure)
        self._bucket = bucket

    async def ensure_bucket(self) -> None:
        """Create the bucket when missing."""
        await s3.ensure_bucket(self._client, self._bucket)

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

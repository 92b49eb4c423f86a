"""Archive objects in S3 (MinIO client; blocking calls run in a thread)."""

from __future__ import annotations

import asyncio
import io

from duanflow_kit import s3


class S3Archive:
    """:class:`duanflow_logs.ports.ArchiveStore` on one S3 bucket."""

    def __init__(self, endpoint: str, access_key: str, secret_key: str, bucket: str, *, secure: bool = False) -> None:
        self._client = s3.client(endpoint, access_key, secret_key, secure=secure)
        self._bucket = bucket

    async def ensure_bucket(self) -> None:
        """Create the bucket when missing."""
        await s3.ensure_bucket(self._client, self._bucket)

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

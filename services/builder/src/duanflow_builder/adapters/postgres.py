"""The image table in Postgres schema ``builder`` (asyncpg)."""

from __future__ import annotations

import re
from typing import Any

import asyncpg
from duanflow_kit.migrations import migrate

from duanflow_builder.ports import ImageRecord

_IDENT = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


def _schema(name: str) -> str:
    if not _IDENT.match(name):
        raise ValueError(f"invalid Postgres schema name {name!r}")
    return f'"{name}"'


class PgImageStore:
    """:class:`duanflow_builder.ports.ImageStore` on an asyncpg pool."""

    def __init__(self, pool: Any, schema: str) -> None:
        self._pool = pool
        self._t = f"{_schema(schema)}.images"

    @classmethod
    async def open(cls, dsn: str, schema: str) -> PgImageStore:
        """Connect, migrate ``schema`` and return the store."""
        pool = await asyncpg.create_pool(dsn, min_size=1, max_size=8)
        async with pool.acquire() as conn:
            await migrate(conn, schema, "duanflow_builder")
        return cls(pool, schema)

    async def close(self) -> None:
        """Close the pool."""
        await self._pool.close()

    async def get(self, image_id: str, backend: str) -> ImageRecord | None:
        """The row of one image, or None."""
        row = await self._pool.fetchrow(
            f"SELECT image_id, backend, status, artifact, duration_ms FROM {self._t} "  # noqa: S608
            "WHERE image_id = $1 AND backend = $2",
            image_id,
            backend,
        )
        if row is None:
            return None
        return ImageRecord(
            image_id=row["image_id"],
            backend=row["backend"],
            status=row["status"],
            artifact=row["artifact"],
            duration_ms=int(row["duration_ms"]),
        )

    async def claim(self, image_id: str, backend: str, spec_json: bytes, stale_after_s: float) -> bool:
        """Insert or take over the row as ``building`` unless built or freshly building elsewhere."""
        got = await self._pool.fetchval(
            f"INSERT INTO {self._t} AS i (image_id, backend, spec, status) "  # noqa: S608
            "VALUES ($1, $2, $3::jsonb, 'building') "
            "ON CONFLICT (image_id, backend) DO UPDATE SET status = 'building', updated_at = now(), "
            "spec = EXCLUDED.spec, log_tail = '' "
            "WHERE i.status = 'failed' OR (i.status = 'building' AND i.updated_at < now() - make_interval(secs => $4)) "
            "RETURNING i.image_id",
            image_id,
            backend,
            spec_json.decode(),
            float(stale_after_s),
        )
        return got is not None

    async def finish(
        self, image_id: str, backend: str, *, status: str, artifact: str, duration_ms: int, log_tail: str
    ) -> None:
        """Record the outcome of a build."""
        await self._pool.execute(
            f"UPDATE {self._t} SET status = $3, artifact = $4, duration_ms = $5, log_tail = $6, "  # noqa: S608
            "updated_at = now() WHERE image_id = $1 AND backend = $2",
            image_id,
            backend,
            status,
            artifact,
            duration_ms,
            log_tail,
        )

    async def forget(self, image_id: str, backend: str) -> None:
        """Mark a built image ``failed`` so the next request claims and builds it again."""
        await self._pool.execute(
            f"UPDATE {self._t} SET status = 'failed', updated_at = now() "  # noqa: S608
            "WHERE image_id = $1 AND backend = $2 AND status = 'built'",
            image_id,
            backend,
        )

    async def count(self) -> int:
        """How many images are built."""
        n = await self._pool.fetchval(f"SELECT count(*) FROM {self._t} WHERE status = 'built'")  # noqa: S608
        return int(n)

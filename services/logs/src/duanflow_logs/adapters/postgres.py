"""The log store on Postgres (asyncpg), in the log service's own schema."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
from duanflow_kit.migrations import migrate
from duanflow_proto.messages.logs import LogLine

from duanflow_logs.domain import COLUMNS, HOUR_MS, ArchiveRef, QueryPlan, Row, line_of

# Only constant column names and placeholders are interpolated; values travel as parameters.
_INSERT = (
    f"INSERT INTO lines ({', '.join(COLUMNS)}) VALUES ({', '.join(f'${i}' for i in range(1, len(COLUMNS) + 1))}) "  # noqa: S608
    "ON CONFLICT DO NOTHING"
)


async def open_pool(dsn: str, schema: str) -> Any:
    """An asyncpg pool whose connections use ``schema``, after applying the log service's migrations."""
    conn = await asyncpg.connect(dsn)
    try:
        await migrate(conn, schema, "duanflow_logs")
    finally:
        await conn.close()
    return await asyncpg.create_pool(
        dsn, min_size=1, max_size=4, server_settings={"search_path": schema, "application_name": "duanflow-logs"}
    )


class PostgresLogStore:
    """:class:`duanflow_logs.ports.LogStore` on an asyncpg pool (search_path = the log service's schema)."""

    def __init__(self, pool: Any) -> None:
        self.pool = pool

    async def ping(self) -> None:
        """Raise when the database is unreachable."""
        await self.pool.fetchval("SELECT 1")

    async def insert(self, rows: list[Row]) -> None:
        """Insert one batch in one transaction; rows already stored (redeliveries) are skipped."""
        if not rows:
            return
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.executemany(_INSERT, rows)

    async def query(self, plan: QueryPlan) -> list[LogLine]:
        """Run one planned query."""
        return [line_of(r) for r in await self.pool.fetch(plan.sql, *plan.params)]

    async def archive_candidates(self, cutoff_ms: int, max_hours: int) -> list[tuple[str, str, int]]:
        """(env, app, hour) with lines older than ``cutoff_ms`` (whole hours only), oldest first."""
        rows = await self.pool.fetch(
            "SELECT DISTINCT env, app, ts_ms - ts_ms % $2 AS hour FROM lines WHERE ts_ms < $1 - $1 % $2 "
            "ORDER BY hour LIMIT $3",
            cutoff_ms,
            HOUR_MS,
            max_hours,
        )
        return [(r["env"], r["app"], r["hour"]) for r in rows]

    async def move_hour(
        self, env: str, app: str, hour_ms: int, upload: Callable[[list[LogLine]], Awaitable[str]]
    ) -> int:
        """Take one app's lines of one hour out of table ``lines``; ``upload`` stores them and returns the key,
        which is indexed in the same transaction (nothing is deleted unless the upload succeeded)."""
        async with self.pool.acquire() as conn, conn.transaction():
            rows = await conn.fetch(
                f"DELETE FROM lines WHERE env = $1 AND app = $2 AND ts_ms >= $3 AND ts_ms < $4 "  # noqa: S608
                f"RETURNING {', '.join(COLUMNS)}",
                env,
                app,
                hour_ms,
                hour_ms + HOUR_MS,
            )
            if not rows:
                return 0
            lines = sorted((line_of(r) for r in rows), key=lambda ln: (ln.ts_ms, ln.seq))
            key = await upload(lines)
            await conn.execute(
                "INSERT INTO archives (env, app, hour_ms, key, lines, min_seq, max_seq) "
                "VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT DO NOTHING",
                env,
                app,
                hour_ms,
                key,
                len(lines),
                min(ln.seq for ln in lines),
                max(ln.seq for ln in lines),
            )
            return len(lines)

    async def archives(self, env: str, app: str, since_ms: int, until_ms: int) -> list[ArchiveRef]:
        """Archives of one app whose hour overlaps ``[since_ms, until_ms]`` (``until_ms`` 0: no bound)."""
        rows = await self.pool.fetch(
            "SELECT env, app, hour_ms, key, lines, min_seq, max_seq FROM archives "
            "WHERE env = $1 AND app = $2 AND hour_ms + $3::bigint > $4::bigint "
            "AND ($5::bigint = 0 OR hour_ms <= $5::bigint) "
            "ORDER BY hour_ms, min_seq",
            env,
            app,
            HOUR_MS,
            since_ms,
            until_ms,
        )
        return [ArchiveRef(**dict(r)) for r in rows]

"""The log store on Postgres (asyncpg), in the log service's own schema."""

from __future__ import annotations

from typing import Any

import asyncpg
from duanflow_kit.migrations import migrate
from duanflow_proto.messages.logs import LogLine

from duanflow_logs.domain import COLUMNS, QueryPlan, Row, line_of

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

"""The release store on Postgres (asyncpg), in the router's own schema."""

from __future__ import annotations

from typing import Any

import asyncpg
from duanflow_kit.migrations import migrate
from duanflow_proto import codec
from duanflow_proto.messages.release import AppSpec, Release

from duanflow_router.domain import function_consumer, function_subject
from duanflow_router.ports import ReplicaRecord

LIVE_STATES = ("starting", "running")


async def open_pool(dsn: str, schema: str) -> Any:
    """An asyncpg pool whose connections use ``schema``, after applying the router's migrations."""
    conn = await asyncpg.connect(dsn)
    try:
        await migrate(conn, schema, "duanflow_router")
    finally:
        await conn.close()
    return await asyncpg.create_pool(
        dsn, min_size=1, max_size=8, server_settings={"search_path": schema, "application_name": "duanflow-router"}
    )


def _release(row: Any) -> Release:
    return Release(
        release_id=row["release_id"],
        app=row["app"],
        env=row["env"],
        created_ms=row["created_ms"],
        bundle_key=row["bundle_key"],
        bundle_digest=row["bundle_digest"],
        image_id=row["image_id"],
        spec=codec.decode(bytes(row["spec"]), AppSpec),
        active=row["active"],
    )


def _replica(row: Any) -> ReplicaRecord:
    return ReplicaRecord(
        replica_id=row["replica_id"],
        env=row["env"],
        app=row["app"],
        release_id=row["release_id"],
        function=row["function"],
        agent_id=row["agent_id"],
        gpu_indices=tuple(row["gpu_indices"]),
        state=row["state"],
    )


class PostgresReleaseStore:
    """:class:`duanflow_router.ports.ReleaseStore` on an asyncpg pool (search_path = the router schema)."""

    def __init__(self, pool: Any) -> None:
        self.pool = pool

    async def ping(self) -> None:
        """Raise when the database is unreachable."""
        await self.pool.fetchval("SELECT 1")

    async def release_ids(self, env: str, app: str, prefix: str) -> set[str]:
        """Release ids of one app starting with ``prefix``."""
        rows = await self.pool.fetch(
            "SELECT release_id FROM releases WHERE env = $1 AND app = $2 AND starts_with(release_id, $3)",
            env,
            app,
            prefix,
        )
        return {r["release_id"] for r in rows}

    async def insert_release(self, release: Release) -> bool:
        """Store a new inactive release with its functions; False when the id is taken."""
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute(
                "INSERT INTO apps (env, name) VALUES ($1, $2) ON CONFLICT DO NOTHING", release.env, release.app
            )
            inserted = await conn.fetchval(
                """INSERT INTO releases (env, app, release_id, created_ms, bundle_key, bundle_digest, image_id, spec)
                   VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT DO NOTHING RETURNING true""",
                release.env,
                release.app,
                release.release_id,
                release.created_ms,
                release.bundle_key,
                release.bundle_digest,
                release.image_id,
                codec.encode(release.spec),
            )
            if not inserted:
                return False
            await conn.executemany(
                """INSERT INTO functions (env, app, release_id, name, kind, subject, consumer, spec)
                   VALUES ($1, $2, $3, $4, $5, $6, $7, $8)""",
                [
                    (
                        release.env,
                        release.app,
                        release.release_id,
                        fn.name,
                        fn.kind,
                        function_subject(release.env, release.app, fn),
                        function_consumer(release.env, release.app, fn)[1],
                        codec.encode(fn),
                    )
                    for fn in release.spec.functions
                ],
            )
            return True

    async def activate(self, env: str, app: str, release_id: str) -> str | None:
        """Make one release the active one of its app; returns the previously active id."""
        async with self.pool.acquire() as conn, conn.transaction():
            previous: str | None = await conn.fetchval(
                "UPDATE releases SET active = false WHERE env = $1 AND app = $2 AND active RETURNING release_id",
                env,
                app,
            )
            await conn.execute(
                "UPDATE releases SET active = true WHERE env = $1 AND app = $2 AND release_id = $3",
                env,
                app,
                release_id,
            )
            return previous

    async def active_release(self, env: str, app: str) -> Release | None:
        """The active release of one app."""
        row = await self.pool.fetchrow("SELECT * FROM releases WHERE env = $1 AND app = $2 AND active", env, app)
        return _release(row) if row else None

    async def active_release_ids(self) -> list[tuple[str, str, str]]:
        """(env, app, release id) of every active release: one indexed query, no spec decoded."""
        rows = await self.pool.fetch("SELECT env, app, release_id FROM releases WHERE active ORDER BY env, app")
        return [(r["env"], r["app"], r["release_id"]) for r in rows]

    async def list_releases(self, env: str, app: str) -> list[Release]:
        """Releases of one app newest first, or the active release of every app when ``app`` is empty."""
        if app:
            rows = await self.pool.fetch(
                "SELECT * FROM releases WHERE env = $1 AND app = $2 ORDER BY created_ms DESC, release_id DESC",
                env,
                app,
            )
        else:
            rows = await self.pool.fetch(
                "SELECT * FROM releases WHERE env = $1 AND active ORDER BY created_ms DESC, app", env
            )
        return [_release(r) for r in rows]

    async def record_replica(self, replica: ReplicaRecord) -> None:
        """Insert or update one replica."""
        await self.pool.execute(
            """INSERT INTO replicas (replica_id, env, app, release_id, function, agent_id, gpu_indices, state)
               VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
               ON CONFLICT (replica_id) DO UPDATE SET state = EXCLUDED.state, updated_at = now()""",
            replica.replica_id,
            replica.env,
            replica.app,
            replica.release_id,
            replica.function,
            replica.agent_id,
            list(replica.gpu_indices),
            replica.state,
        )

    async def set_replica_state(self, replica_id: str, state: str) -> None:
        """Change one replica's state."""
        await self.pool.execute(
            "UPDATE replicas SET state = $2, updated_at = now() WHERE replica_id = $1", replica_id, state
        )

    async def running_replicas(self, env: str | None = None, app: str | None = None) -> list[ReplicaRecord]:
        """Replicas starting or running, optionally of one app."""
        rows = await self.pool.fetch(
            """SELECT * FROM replicas WHERE state = ANY($1::text[])
               AND ($2::text IS NULL OR env = $2) AND ($3::text IS NULL OR app = $3) ORDER BY created_at""",
            list(LIVE_STATES),
            env,
            app,
        )
        return [_replica(r) for r in rows]

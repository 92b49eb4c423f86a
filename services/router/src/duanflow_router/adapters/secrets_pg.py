"""The secrets table and the app on/off switch in the router's Postgres schema (asyncpg; search_path set)."""

from __future__ import annotations

from typing import Any

from duanflow_router.ports_secrets import SealedValue, SecretRow

_COLS = "env, name, keys, key_id, nonce, ciphertext, created_ms, updated_ms"


def _row(r: Any) -> SecretRow:
    return SecretRow(
        env=r["env"],
        name=r["name"],
        keys=tuple(r["keys"]),
        sealed=SealedValue(key_id=r["key_id"], nonce=bytes(r["nonce"]), ciphertext=bytes(r["ciphertext"])),
        created_ms=int(r["created_ms"]),
        updated_ms=int(r["updated_ms"]),
    )


class PostgresSecretStore:
    """:class:`duanflow_router.ports_secrets.SecretStore` on the router's pool."""

    def __init__(self, pool: Any) -> None:
        self.pool = pool

    async def put(self, row: SecretRow, *, replace: bool) -> bool:
        """Insert, or overwrite when ``replace`` (keeping ``created_ms``); False when it exists and not replacing."""
        conflict = (
            "DO UPDATE SET keys = EXCLUDED.keys, key_id = EXCLUDED.key_id, nonce = EXCLUDED.nonce, "
            "ciphertext = EXCLUDED.ciphertext, updated_ms = EXCLUDED.updated_ms"
            if replace
            else "DO NOTHING"
        )
        got = await self.pool.fetchval(
            f"INSERT INTO secrets ({_COLS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8) "  # noqa: S608
            f"ON CONFLICT (env, name) {conflict} RETURNING name",
            row.env,
            row.name,
            list(row.keys),
            row.sealed.key_id,
            row.sealed.nonce,
            row.sealed.ciphertext,
            row.created_ms,
            row.updated_ms,
        )
        return got is not None

    async def get(self, env: str, names: list[str]) -> dict[str, SecretRow]:
        """Rows of ``names`` that exist."""
        rows = await self.pool.fetch(
            f"SELECT {_COLS} FROM secrets WHERE env = $1 AND name = ANY($2::text[])",  # noqa: S608
            env,
            names,
        )
        return {r["name"]: _row(r) for r in rows}

    async def list(self, env: str) -> list[SecretRow]:
        """Every secret of ``env`` by name."""
        rows = await self.pool.fetch(f"SELECT {_COLS} FROM secrets WHERE env = $1 ORDER BY name", env)  # noqa: S608
        return [_row(r) for r in rows]

    async def delete(self, env: str, name: str) -> SecretRow | None:
        """Remove one row; the removed row or None."""
        r = await self.pool.fetchrow(
            f"DELETE FROM secrets WHERE env = $1 AND name = $2 RETURNING {_COLS}",  # noqa: S608
            env,
            name,
        )
        return _row(r) if r is not None else None


class PostgresAppSwitch:
    """Turns an app off: no release of it stays active (``duanflow stop``)."""

    def __init__(self, pool: Any) -> None:
        self.pool = pool

    async def deactivate(self, env: str, app: str) -> str | None:
        """Clear the active flag of the app's release; the release that was active, or None."""
        got = await self.pool.fetchval(
            "UPDATE releases SET active = false WHERE env = $1 AND app = $2 AND active RETURNING release_id",
            env,
            app,
        )
        return str(got) if got is not None else None

"""Plain versioned SQL migrations, one schema per service, applied at start-up under an advisory lock."""

from __future__ import annotations

import hashlib
import re
from importlib import resources
from typing import Any

_IDENT = re.compile(r"[a-z_][a-z0-9_]{0,62}")


async def migrate(conn: Any, schema: str, package: str) -> list[str]:
    """Apply ``package``'s ``migrations/NNNN_name.sql`` files not yet applied to ``schema``.

    Returns the names applied now. Safe to run from many instances at once (advisory lock).
    """
    files = sorted(
        (f for f in resources.files(package).joinpath("migrations").iterdir() if f.name.endswith(".sql")),
        key=lambda f: f.name,
    )
    if not _IDENT.fullmatch(schema):
        # The schema is spliced into SQL (identifiers cannot be bound parameters), so only plain names pass.
        raise ValueError(f"schema name {schema!r} must match {_IDENT.pattern}")
    lock = int.from_bytes(hashlib.sha256(schema.encode()).digest()[:8], "big", signed=True)
    applied: list[str] = []
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", lock)
        await conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{schema}"')
        await conn.execute(
            f'CREATE TABLE IF NOT EXISTS "{schema}".schema_migrations '
            "(name text PRIMARY KEY, applied_at timestamptz DEFAULT now())"
        )
        done = {r["name"] for r in await conn.fetch(f'SELECT name FROM "{schema}".schema_migrations')}  # noqa: S608
        for f in files:
            if f.name in done:
                continue
            await conn.execute(f'SET LOCAL search_path TO "{schema}"')
            await conn.execute(f.read_text())
            await conn.execute(f'INSERT INTO "{schema}".schema_migrations (name) VALUES ($1)', f.name)  # noqa: S608
            applied.append(f.name)
    return applied

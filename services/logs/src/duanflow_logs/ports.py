"""What the log service's use cases need from the outside world, as Protocols (adapters implement them)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Protocol

from duanflow_proto.messages.logs import LogLine

from duanflow_logs.domain import ArchiveRef, QueryPlan, Row


class LogStore(Protocol):
    """Durable log lines (Postgres)."""

    async def ping(self) -> None:
        """Raise when the store is unreachable."""

    async def insert(self, rows: list[Row]) -> None:
        """Store rows (``domain.COLUMNS`` order) in one batch; rows already stored are skipped."""

    async def query(self, plan: QueryPlan) -> list[LogLine]:
        """Run one planned query."""

    async def archive_candidates(self, cutoff_ms: int, max_hours: int) -> list[tuple[str, str, int]]:
        """(env, app, hour) holding lines older than ``cutoff_ms`` (whole hours), oldest first."""

    async def move_hour(
        self, env: str, app: str, hour_ms: int, upload: Callable[[list[LogLine]], Awaitable[str]]
    ) -> int:
        """Move one app's lines of one hour out through ``upload`` (returns the key indexed); how many moved."""

    async def archives(self, env: str, app: str, since_ms: int, until_ms: int) -> list[ArchiveRef]:
        """Archives of one app whose hour overlaps the range."""


class ArchiveStore(Protocol):
    """Archive objects (S3)."""

    async def put(self, key: str, data: bytes) -> None:
        """Store one object."""

    async def get(self, key: str) -> bytes:
        """Read one object."""

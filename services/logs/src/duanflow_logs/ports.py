"""What the log service's use cases need from the outside world, as Protocols (adapters implement them)."""

from __future__ import annotations

from typing import Protocol

from duanflow_proto.messages.logs import LogLine

from duanflow_logs.domain import QueryPlan, Row


class LogStore(Protocol):
    """Durable log lines (Postgres)."""

    async def ping(self) -> None:
        """Raise when the store is unreachable."""

    async def insert(self, rows: list[Row]) -> None:
        """Store rows (``domain.COLUMNS`` order) in one batch; rows already stored are skipped."""

    async def query(self, plan: QueryPlan) -> list[LogLine]:
        """Run one planned query."""

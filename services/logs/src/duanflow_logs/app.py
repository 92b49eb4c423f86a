"""Wiring of the log service: the kit Service (NATS health, SIGTERM), the query handler, and a lifespan owning
the Postgres pool and the ingestion loop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

from duanflow_kit.service import Service, stop_tasks
from duanflow_kit.streams import ensure_streams

from duanflow_logs import domain, handlers
from duanflow_logs.adapters.nats import logs_subscription
from duanflow_logs.adapters.postgres import PostgresLogStore, open_pool
from duanflow_logs.adapters.s3 import S3Archive
from duanflow_logs.settings import Settings

log = logging.getLogger("duanflow.logs")

DRAIN_TIMEOUT_S = 5.0


class LogsApp:
    """The log service: :attr:`service` with handlers registered; :attr:`ingestor` once started."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.service = Service("logs", settings)
        self._store: PostgresLogStore | None = None
        self.ingestor: handlers.Ingestor | None = None
        self.archiver: handlers.Archiver | None = None
        self.bucket = S3Archive(
            settings.s3_endpoint,
            settings.s3_access_key,
            settings.s3_secret_key,
            settings.s3_bucket,
            secure=settings.s3_secure,
        )
        handlers.register(
            self.service,
            self.store,
            settings.max_query_lines,
            domain.DEFAULT_MAX_REPLY_BYTES,
            lambda: self.bucket,
        )
        self.service.health_checks.append(self._health)

    def store(self) -> PostgresLogStore:
        """The log store (only between start-up and shutdown)."""
        if self._store is None:
            raise RuntimeError("log service not started")
        return self._store

    async def _health(self) -> dict[str, str]:
        if self._store is None or self.ingestor is None:
            return {"state": "starting"}
        await self._store.ping()
        return {
            "db": "ok",
            "stored": str(self.ingestor.stored),
            "malformed": str(self.ingestor.malformed),
            "failed_batches": str(self.ingestor.failed_batches),
            "archived": str(self.archiver.archived if self.archiver else 0),
        }

    @contextlib.asynccontextmanager
    async def lifespan(self, service: Service) -> AsyncIterator[None]:
        """Open Postgres (migrated) and the logs stream, then ingest until shutdown."""
        s = self.settings
        pool: Any = await open_pool(s.database_url, s.schema)
        try:
            await ensure_streams(service.js)
            store = PostgresLogStore(pool)
            sub = await logs_subscription(service.js, s.consumer, s.filter_subject, s.batch_size)
            ingestor = handlers.Ingestor(store, s.batch_size)
            archiver = handlers.Archiver(store, self.bucket, s.archive_after_s, s.archive_interval_s)
            try:
                await self.bucket.ensure_bucket()
            except Exception as exc:  # S3 down: ingest and answer anyway; archive rounds retry
                log.warning("archive bucket %s unavailable: %s: %s", s.s3_bucket, type(exc).__name__, exc)
            stop = asyncio.Event()
            try:
                async with asyncio.TaskGroup() as tg:
                    ingesting = tg.create_task(ingestor.run(sub, stop), name="logs-ingest")
                    archiving = tg.create_task(archiver.run(stop), name="logs-archive")
                    self._store, self.ingestor, self.archiver = store, ingestor, archiver
                    log.info("log service ready (schema %s, consumer %s on %s)", s.schema, s.consumer, s.filter_subject)
                    try:
                        yield
                    finally:
                        self._store = None
                        stop.set()
                        # The loop ends within one fetch; a batch being stored finishes (its acks follow the insert).
                        _, late = await asyncio.wait({ingesting, archiving}, timeout=DRAIN_TIMEOUT_S)
                        await stop_tasks(*late)
            finally:
                # Also when cancelled: a pull subscription left open would hold the connection's drain for 30 s.
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()
        finally:
            await pool.close()

    async def run(self) -> None:
        """Run until SIGTERM/SIGINT."""
        await self.service.run(self.lifespan)


def build_app(settings: Settings) -> LogsApp:
    """The log service for ``settings``, ready to :meth:`LogsApp.run`."""
    return LogsApp(settings)

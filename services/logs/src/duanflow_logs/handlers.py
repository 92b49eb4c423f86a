"""Transport only: the query subject and the ingestion loop (fetch → domain → store → ack). No rules here."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

from duanflow_kit.service import Service
from duanflow_proto import subjects
from duanflow_proto.messages.logs import LogLine, LogQuery, LogQueryReply
from nats.errors import TimeoutError as NatsTimeoutError

from duanflow_logs import domain
from duanflow_logs.ports import ArchiveStore, LogStore

log = logging.getLogger("duanflow.logs.handlers")

FETCH_TIMEOUT_S = 1.0
RETRY_DELAY_S = 2.0


def register(
    service: Service,
    store: Callable[[], LogStore],
    max_lines: int,
    max_reply_bytes: int,
    archive: Callable[[], ArchiveStore | None] = lambda: None,
) -> None:
    """Register the log service's request/reply handlers (queue group ``logs``) on ``service``.

    ``store`` (and ``archive``) return the stores opened by the lifespan (handlers run only after it).
    """

    @service.request(subjects.API_LOG_QUERY, LogQuery)
    async def query(req: LogQuery) -> LogQueryReply:
        plan = domain.plan_query(req, max_lines)
        lines = await store().query(plan)
        bucket = archive()
        if bucket is not None:
            lines = await with_archived(store(), bucket, req, lines, plan.limit)
        return domain.reply_of(lines, plan.limit, max_reply_bytes)


async def with_archived(
    store: LogStore, bucket: ArchiveStore, req: LogQuery, lines: list[LogLine], limit: int
) -> list[LogLine]:
    """``lines`` (from Postgres, ``limit + 1`` at most) merged with the archived lines answering ``req``: archives
    are read oldest hour first, until the hours left cannot hold lines older than the ``limit + 1`` kept."""
    refs = domain.archives_needed(req, await store.archives(req.env, req.app, req.since_ms, req.until_ms))
    found: list[LogLine] = []
    for ref in refs:
        merged = domain.merge(lines, found, limit=limit)
        if len(merged) > limit and ref.hour_ms > merged[-1].ts_ms:
            break
        found.extend(ln for ln in domain.decode_archive(await bucket.get(ref.key)) if domain.matches(req, ln))
    return domain.merge(lines, found, limit=limit) if refs else lines


class Archiver:
    """Moves lines older than ``after_s`` from Postgres to S3, one object per app and hour, indexed in Postgres."""

    def __init__(self, store: LogStore, bucket: ArchiveStore, after_s: float, interval_s: float) -> None:
        self.store, self.bucket = store, bucket
        self.after_s, self.interval_s = after_s, interval_s
        self.archived = 0
        """Lines archived since start."""
        self.failed = 0
        """Hours that could not be archived (retried on the next round)."""

    async def run(self, stop: asyncio.Event) -> None:
        """Archive a round every ``interval_s`` until ``stop`` is set; never raises."""
        while not stop.is_set():
            try:
                await self.round(int(time.time() * 1000))
            except Exception as exc:
                log.warning("archive round failed: %s: %s", type(exc).__name__, exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.interval_s)

    async def round(self, now_ms: int, max_hours: int = 100) -> int:
        """Archive every whole hour older than ``now - after_s``; returns how many lines moved."""
        moved = 0
        for env, app, hour in await self.store.archive_candidates(now_ms - int(self.after_s * 1000), max_hours):

            async def upload(lines: list[LogLine], env: str = env, app: str = app, hour: int = hour) -> str:
                key = domain.archive_key(env, app, hour, lines[0].seq, lines[-1].seq)
                await self.bucket.put(key, domain.encode_archive(lines))
                return key

            try:
                moved += await self.store.move_hour(env, app, hour, upload)
            except Exception as exc:
                self.failed += 1
                log.warning("could not archive %s/%s hour %d: %s: %s", env, app, hour, type(exc).__name__, exc)
        self.archived += moved
        return moved


class Ingestor:
    """Takes log lines from the stream in batches and stores them; acks only what is stored."""

    def __init__(self, store: LogStore, batch_size: int) -> None:
        self.store = store
        self.batch_size = batch_size
        self.stored = 0
        """Lines stored since start."""
        self.malformed = 0
        """Messages terminated because they are not log lines."""
        self.failed_batches = 0
        """Batches that could not be stored (left for redelivery)."""
        self._warned: set[str] = set()

    async def run(self, sub: Any, stop: asyncio.Event) -> None:
        """Fetch and store until ``stop`` is set; never raises on bad data or a broken database."""
        while not stop.is_set():
            try:
                msgs = await sub.fetch(self.batch_size, timeout=FETCH_TIMEOUT_S)
            except (NatsTimeoutError, TimeoutError):
                continue
            except Exception as exc:
                log.warning("could not fetch log lines: %s: %s", type(exc).__name__, exc)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), RETRY_DELAY_S)
                continue
            await self.take(msgs)

    async def take(self, msgs: list[Any]) -> None:
        """Store one fetched batch: malformed messages are terminated, stored ones acked, the rest naked."""
        batch = domain.split_batch([(m.metadata.sequence.stream, m.data) for m in msgs])
        for i, why in zip(batch.malformed, batch.errors, strict=True):
            self.malformed += 1
            subject = msgs[i].subject
            # Log once per subject: a broken publisher must not flood the log with its own garbage.
            if subject not in self._warned:
                self._warned.add(subject)
                log.warning("dropping malformed message on %s: %s", subject, why)
            await msgs[i].term()
        try:
            await self.store.insert(batch.rows)
        except Exception as exc:
            self.failed_batches += 1
            log.warning("could not store %d log lines, retrying later: %r", len(batch.rows), exc)
            for i in batch.stored:
                await msgs[i].nak(delay=RETRY_DELAY_S)
            return
        for i in batch.stored:
            await msgs[i].ack()
        self.stored += len(batch.rows)

"""Transport only: the query subject and the ingestion loop (fetch → domain → store → ack). No rules here."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

from duanflow_kit.service import Service
from duanflow_proto import subjects
from duanflow_proto.messages.logs import LogQuery, LogQueryReply
from nats.errors import TimeoutError as NatsTimeoutError

from duanflow_logs import domain
from duanflow_logs.ports import LogStore

log = logging.getLogger("duanflow.logs.handlers")

FETCH_TIMEOUT_S = 1.0
RETRY_DELAY_S = 2.0


def register(service: Service, store: Callable[[], LogStore], max_lines: int, max_reply_bytes: int) -> None:
    """Register the log service's request/reply handlers (queue group ``logs``) on ``service``.

    ``store`` returns the log store opened by the lifespan (handlers run only after it).
    """

    @service.request(subjects.API_LOG_QUERY, LogQuery)
    async def query(req: LogQuery) -> LogQueryReply:
        plan = domain.plan_query(req, max_lines)
        lines = await store().query(plan)
        return domain.reply_of(lines, plan.limit, max_reply_bytes)


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

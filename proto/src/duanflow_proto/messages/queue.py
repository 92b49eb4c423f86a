"""Work queues (``df.Queue``, ``@app.worker``): dead letters and the queue control API (router)."""

from __future__ import annotations

from typing import Final

import msgspec

HDR_JOB_ID: Final = "Df-Job-Id"
"""Header of a queue message carrying the job's stable id (its ``Nats-Msg-Id`` too, so a re-sent put is stored once)."""


class DeadLetter(msgspec.Struct, frozen=True, kw_only=True, tag="duanflow.v1.queue.dead_letter", tag_field="type"):
    """A job that failed every attempt, as a worker publishes it on ``subjects.dead_letter(env, queue)``."""

    job_id: str
    """The job's stable id (``Df-Job-Id``)."""
    queue: str
    """Queue name."""
    attempts: int
    """How many times it ran."""
    error: str
    """``ExcType: message`` of the last failure."""
    exc_type: str = ""
    """``module.QualName`` of the last exception."""
    traceback: str = ""
    """Formatted traceback of the last failure."""
    data: bytes = b""
    """The job's original message body (a replay publishes it again)."""
    failed_at: float = 0.0
    """Unix time of the last failure."""
    seq: int = 0
    """Sequence on the dead-letter stream (filled when listed)."""


class QueueRequest(msgspec.Struct, frozen=True, kw_only=True, tag="duanflow.v1.queue.request", tag_field="type"):
    """Inspect one queue, list its dead letters, or replay them (``API_QUEUE_*``)."""

    queue: str
    """Queue name, as in ``df.Queue(name)``."""
    env: str = "main"
    """Environment."""
    limit: int = 100
    """Most dead letters listed or replayed."""


class QueueInfo(msgspec.Struct, frozen=True, kw_only=True, tag="duanflow.v1.queue.info", tag_field="type"):
    """One queue's counts."""

    queue: str
    """Queue name."""
    env: str = "main"
    """Environment."""
    depth: int = 0
    """Jobs stored and not finished (waiting, running or waiting for a retry)."""
    waiting: int = 0
    """Jobs not handed to a worker yet (0 when no worker was deployed: then ``depth`` is what waits)."""
    in_flight: int = 0
    """Jobs a worker holds (running, or delivered and not acked yet)."""
    dead: int = 0
    """Dead letters."""
    has_consumer: bool = False
    """Whether a worker for the queue was deployed (its durable consumer exists)."""


class DeadLetterList(msgspec.Struct, frozen=True, kw_only=True, tag="duanflow.v1.queue.dead_list", tag_field="type"):
    """Dead letters of one queue, oldest first."""

    letters: list[DeadLetter] = []
    """The dead letters, each with its job, last error and traceback."""


class QueueReplayReply(msgspec.Struct, frozen=True, kw_only=True, tag="duanflow.v1.queue.replay", tag_field="type"):
    """What a replay put back on the queue."""

    replayed: list[str] = []
    """Job ids published to the queue again (their dead letters removed)."""


class StorageRequest(msgspec.Struct, frozen=True, kw_only=True, tag="duanflow.v1.storage.request", tag_field="type"):
    """One ``df.storage`` operation on ``s3://bucket/key`` (``bucket`` empty: the stack's bucket)."""

    key: str
    """Object key (a prefix for ``API_STORAGE_LIST``)."""
    bucket: str = ""
    """Bucket (empty: the stack's own)."""
    op: str = "get"
    """``get`` (GET URL), ``put`` (PUT URL) or ``head`` (existence only)."""
    limit: int = 1000
    """Most keys listed."""


class StorageReply(msgspec.Struct, frozen=True, kw_only=True, tag="duanflow.v1.storage.reply", tag_field="type"):
    """A presigned URL, whether the object exists, or the keys under a prefix."""

    bucket: str
    """Bucket the answer is about."""
    url: str = ""
    """Presigned URL (``get``/``put``)."""
    exists: bool = False
    """Whether the object exists (``head``)."""
    keys: list[str] = []
    """Keys under the prefix (``API_STORAGE_LIST``)."""

"""Work queues that ``@app.worker`` functions consume."""

from __future__ import annotations

import contextvars
import secrets
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Final, TypeVar

import cloudpickle
from duanflow_proto import codec, subjects
from duanflow_proto.messages.queue import (
    HDR_JOB_ID,
    DeadLetter,
    DeadLetterList,
    QueueInfo,
    QueueReplayReply,
    QueueRequest,
)

from duanflow._errors import InvalidOptionError

HDR_MSG_ID: Final = "Nats-Msg-Id"
PUT_CHUNK: Final = 512
"""Publishes of ``put_many`` in flight at once (their PubAcks awaited together)."""

T = TypeVar("T")

_current_job: contextvars.ContextVar[str] = contextvars.ContextVar("duanflow_job_id", default="")


def current_job_id() -> str:
    """The id of the queue job being run (stable across its retries; ``""`` outside a worker): deduplicate on it."""
    return _current_job.get()


def new_job_id() -> str:
    """A fresh job id."""
    return f"job-{time.time_ns():x}-{secrets.token_hex(6)}"


def encode_job(obj: Any) -> bytes:
    """A job's message body."""
    return cloudpickle.dumps(obj)  # type: ignore[no-any-return]


def decode_job(data: bytes) -> Any:
    """A job's object from its message body."""
    return cloudpickle.loads(data)


def encode_dead_letter(letter: DeadLetter) -> bytes:
    """Body of a dead-letter message."""
    return codec.encode(letter)


def decode_dead_letter(data: bytes) -> DeadLetter:
    """A dead-letter message's body."""
    return codec.decode(data, DeadLetter)


@dataclass(frozen=True, slots=True)
class Queue:
    """A durable work queue; ``@app.worker(queue=...)`` replicas consume it.

    A failed message is retried up to ``max_retries`` times with backoff, then dead-lettered.

    Example::

        audio_queue = df.Queue("audio-inbox", max_retries=3)

        @app.worker(queue=audio_queue, gpu="A10G", scale_to=12)
        def transcribe_audio(job): ...
    """

    name: str
    max_retries: int = 3

    def __post_init__(self) -> None:
        try:
            subjects.token(self.name if isinstance(self.name, str) else "")
        except ValueError as exc:
            raise InvalidOptionError(f"Queue name: {exc}") from None
        if (
            isinstance(self.max_retries, bool)
            or not isinstance(self.max_retries, int)
            or not 0 <= self.max_retries <= 100
        ):
            raise InvalidOptionError(f"Queue(max_retries=) must be an int from 0 to 100, got {self.max_retries!r}")

    def put(self, obj: Any, *, job_id: str | None = None) -> str:
        """Add one job (any picklable object); returns its job id once JetStream stored it."""
        return self.put_many([obj], job_ids=[job_id] if job_id else None)[0]

    def put_many(self, objs: Iterable[Any], *, job_ids: list[str] | None = None) -> list[str]:
        """Add many jobs; returns their ids (in order) once JetStream stored every one."""
        from duanflow._client import get_client

        client = get_client()
        return client.run(self._put_async, client, list(objs), job_ids)

    async def _put_async(self, client: Any, objs: list[Any], job_ids: list[str] | None) -> list[str]:
        import asyncio

        nc = await client.connect()
        js = nc.jetstream()
        subject = subjects.queue(client.env, self.name)
        ids = list(job_ids) if job_ids is not None else [new_job_id() for _ in objs]
        if len(ids) != len(objs):
            raise InvalidOptionError(f"put_many got {len(objs)} jobs but {len(ids)} job ids")
        for start in range(0, len(objs), PUT_CHUNK):
            chunk = range(start, min(start + PUT_CHUNK, len(objs)))
            await asyncio.gather(
                *(
                    js.publish(subject, encode_job(objs[i]), headers={HDR_MSG_ID: ids[i], HDR_JOB_ID: ids[i]})
                    for i in chunk
                )
            )
        return ids

    def __len__(self) -> int:
        """Jobs not finished yet: waiting, running, or waiting for a retry (dead letters not included)."""
        from duanflow._client import get_client

        client = get_client()
        return client.run(self._len_async, client)

    async def _len_async(self, client: Any) -> int:
        nc = await client.connect()
        subject = subjects.queue(client.env, self.name)
        info = await nc.jetstream().stream_info(subjects.STREAM_QUEUES, subjects_filter=subject)
        return int((info.state.subjects or {}).get(subject, 0))

    def info(self) -> QueueInfo:
        """Depth, jobs waiting and in flight, and dead letters (asks the router)."""
        return _control(subjects.API_QUEUE_INSPECT, QueueRequest(queue=self.name), QueueInfo)

    def dead_letters(self, limit: int = 100) -> list[DeadLetter]:
        """The queue's dead letters, oldest first: each with its job id, attempts, last error and traceback."""
        return _control(subjects.API_QUEUE_DEAD, QueueRequest(queue=self.name, limit=limit), DeadLetterList).letters

    def replay(self, limit: int = 100) -> list[str]:
        """Put up to ``limit`` dead letters back on the queue (same job ids); returns the ids replayed."""
        reply = _control(subjects.API_QUEUE_REPLAY, QueueRequest(queue=self.name, limit=limit), QueueReplayReply)
        return reply.replayed


def _control(subject: str, req: QueueRequest, reply_type: type[T]) -> T:
    from duanflow._client import get_client

    client = get_client()
    req = QueueRequest(queue=req.queue, env=client.env, limit=req.limit)

    async def ask() -> T:
        return await client.request(subject, req, reply_type)

    return client.run(ask)

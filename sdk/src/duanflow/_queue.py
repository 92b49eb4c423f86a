"""Work queues that ``@app.worker`` functions consume."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import contextvars
import secrets
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Final, TypeVar

import cloudpickle
import msgspec
import nats.errors
from duanflow_proto import codec, subjects
from duanflow_proto.errors import PayloadTooLargeError, UnavailableError
from duanflow_proto.messages.queue import (
    HDR_JOB_ID,
    DeadLetter,
    DeadLetterList,
    QueueInfo,
    QueueReplayReply,
    QueueRequest,
)

from duanflow._errors import InvalidOptionError
from duanflow._inbox import subscribe_direct

HDR_MSG_ID: Final = "Nats-Msg-Id"
PUT_WINDOW: Final = 4096
"""Publishes of ``put_many`` whose PubAck is awaited at once."""
PUT_ACK_TIMEOUT_S: Final = 5.0
"""How long ``put_many`` waits for any PubAck before it publishes the unconfirmed jobs again (same message id)."""
PUT_ATTEMPTS: Final = 4

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
        nc = await client.connect()
        subject = subjects.queue(client.env, self.name)
        ids = list(job_ids) if job_ids is not None else [new_job_id() for _ in objs]
        if len(ids) != len(objs):
            raise InvalidOptionError(f"put_many got {len(objs)} jobs but {len(ids)} job ids")
        await _Publisher(nc, subject).publish([encode_job(obj) for obj in objs], ids)
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


class _Publisher:
    """Publishes jobs to JetStream with their PubAcks gathered on one inbox (no task or future per job).

    Up to :data:`PUT_WINDOW` publishes are unconfirmed at once. Jobs not confirmed within
    :data:`PUT_ACK_TIMEOUT_S` (a NATS restart, a lost PubAck) are published again under the same ``Nats-Msg-Id``,
    so JetStream stores each job once (within the stream's duplicate window).
    """

    def __init__(self, nc: Any, subject: str) -> None:
        self.nc = nc
        self.subject = subject
        self.inbox = nc.new_inbox()
        self.skip = len(self.inbox) + 1
        self.waiting: dict[str, int] = {}
        """Reply token → index of each job published and not confirmed yet."""
        self.progress = asyncio.Event()
        self.low = PUT_WINDOW // 2
        self.error: Exception | None = None

    def _on_ack(self, msg: Any) -> None:
        # In the connection's read loop (duanflow._inbox): no awaiting here.
        if self.waiting.pop(msg.subject[self.skip :], None) is None:
            return
        data = msg.data
        if not data or b'"error"' in data:
            self.error = self.error or self._failure(msg)
        if len(self.waiting) <= self.low:
            self.progress.set()

    def _failure(self, msg: Any) -> Exception:
        headers = msg.headers or {}
        if headers.get("Status") == "503":
            return UnavailableError(
                f"no JetStream stream takes {self.subject}: is the DuanFlow stack running (duanflow dev up)?"
            )
        try:
            description = msgspec.json.decode(msg.data).get("error", {}).get("description", "")
        except (msgspec.DecodeError, AttributeError):
            description = msg.data[:200].decode(errors="replace")
        if "size" in description or "payload" in description:
            return PayloadTooLargeError(f"JetStream refused a job of {self.subject}: {description}")
        return UnavailableError(f"JetStream refused a job of {self.subject}: {description or headers}")

    async def publish(self, bodies: list[bytes], ids: list[str]) -> None:
        """Publish every body (job ``ids[i]``); return once JetStream stored them all."""
        limit = self.nc.max_payload
        for i, body in enumerate(bodies):
            if len(body) > limit:
                raise PayloadTooLargeError(
                    f"job {i} of put_many is {len(body)} bytes pickled; a queue message takes at most {limit}: "
                    "put large data in df.storage and the URL in the job"
                )
        sub = await subscribe_direct(self.nc, f"{self.inbox}.*", self._on_ack)
        try:
            await self._publish_all(bodies, ids)
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    async def _publish_all(self, bodies: list[bytes], ids: list[str]) -> None:
        todo = collections.deque(range(len(bodies)))
        waiting = self.waiting
        publish = self.nc.publish
        subject, inbox = self.subject, self.inbox
        give_up_s = PUT_ATTEMPTS * PUT_ACK_TIMEOUT_S
        last_progress = time.monotonic()
        while todo or waiting:
            blocked = False
            while todo and len(waiting) < PUT_WINDOW:
                i = todo[0]
                token = f"{i:x}"
                waiting[token] = i
                job_id = ids[i]
                try:
                    await publish(
                        subject, bodies[i], reply=f"{inbox}.{token}", headers={HDR_MSG_ID: job_id, HDR_JOB_ID: job_id}
                    )
                except nats.errors.ConnectionClosedError:
                    raise UnavailableError(f"the connection to NATS closed while putting jobs on {subject}") from None
                except nats.errors.Error:
                    # Reconnecting with the outgoing buffer full: try again shortly.
                    del waiting[token]
                    blocked = True
                    break
                todo.popleft()
            if self.error is not None:
                raise self.error
            if time.monotonic() - last_progress > give_up_s:
                raise UnavailableError(
                    f"JetStream did not confirm {len(waiting) + len(todo)} of {len(bodies)} jobs put on "
                    f"{subject} within {give_up_s:g}s: is NATS up?"
                )
            if not waiting:
                if blocked:
                    await asyncio.sleep(0.1)
                continue
            self.progress.clear()
            if len(waiting) <= self.low and todo and not blocked:
                continue
            try:
                await asyncio.wait_for(self.progress.wait(), PUT_ACK_TIMEOUT_S)
            except TimeoutError:
                # Unconfirmed (a NATS restart lost them or their PubAcks): publish them again, first; under the same
                # message ids JetStream stores each once.
                todo.extendleft(sorted(waiting.values(), reverse=True))
                waiting.clear()
                continue
            last_progress = time.monotonic()
            if self.error is not None:
                raise self.error


def _control(subject: str, req: QueueRequest, reply_type: type[T]) -> T:
    from duanflow._client import get_client

    client = get_client()
    req = QueueRequest(queue=req.queue, env=client.env, limit=req.limit)

    async def ask() -> T:
        return await client.request(subject, req, reply_type)

    return client.run(ask)

"""Work queues' control API (inspect, dead letters, replay) and ``df.storage``'s presigned URLs.

Clients hold neither the rights to read the dead-letter stream nor S3 keys: the router does both for them.
"""

from __future__ import annotations

import asyncio
import re
from typing import Any, Final

from duanflow_proto import codec, subjects
from duanflow_proto.errors import InvalidInputError, NotFoundError
from duanflow_proto.messages.queue import (
    HDR_JOB_ID,
    DeadLetter,
    DeadLetterList,
    QueueInfo,
    QueueReplayReply,
    QueueRequest,
    StorageReply,
    StorageRequest,
)
from nats.js import JetStreamContext
from nats.js.api import DeliverPolicy
from nats.js.errors import NotFoundError as JsNotFoundError

from duanflow_router.adapters.s3 import S3BlobStore
from duanflow_router.handlers import Route

HDR_MSG_ID: Final = "Nats-Msg-Id"
MAX_LIST: Final = 10_000
READ_TIMEOUT_S: Final = 5.0
STORAGE_URL_TTL_S: Final = 3600
RESERVED_PREFIXES: Final = ("bundles/", "payloads/", "images/", "logs/")
"""Keys of the stack's bucket the platform itself writes: ``df.storage`` may not touch them."""
_KEY: Final = re.compile(r"^[A-Za-z0-9!_.*'()/=+,@ -]{1,1024}$")


def _names(req: QueueRequest) -> tuple[str, str]:
    try:
        return subjects.token(req.env), subjects.token(req.queue)
    except ValueError as exc:
        raise InvalidInputError(f"invalid queue or env name: {exc}") from None


class QueueApi:
    """Counts, dead letters and replays of the work queues, on the router's JetStream connection."""

    def __init__(self, js: JetStreamContext) -> None:
        self.js = js

    async def _count(self, stream: str, subject: str) -> int:
        info = await self.js.stream_info(stream, subjects_filter=subject)
        return int((info.state.subjects or {}).get(subject, 0))

    async def inspect(self, req: QueueRequest) -> QueueInfo:
        """Depth, waiting, in flight and dead letters of one queue."""
        env, name = _names(req)
        depth = await self._count(subjects.STREAM_QUEUES, subjects.queue(env, name))
        dead = await self._count(subjects.STREAM_DEAD_LETTERS, subjects.dead_letter(env, name))
        try:
            consumer = await self.js.consumer_info(subjects.STREAM_QUEUES, subjects.queue_consumer(env, name))
        except JsNotFoundError:
            return QueueInfo(queue=name, env=env, depth=depth, waiting=depth, dead=dead)
        return QueueInfo(
            queue=name,
            env=env,
            depth=depth,
            waiting=int(consumer.num_pending or 0),
            in_flight=int(consumer.num_ack_pending or 0),
            dead=dead,
            has_consumer=True,
        )

    async def dead(self, req: QueueRequest) -> DeadLetterList:
        """Up to ``req.limit`` dead letters of one queue, oldest first."""
        env, name = _names(req)
        return DeadLetterList(letters=await self._letters(env, name, req.limit))

    async def _letters(self, env: str, name: str, limit: int) -> list[DeadLetter]:
        subject = subjects.dead_letter(env, name)
        count = min(await self._count(subjects.STREAM_DEAD_LETTERS, subject), max(0, min(limit, MAX_LIST)))
        if not count:
            return []
        sub = await self.js.subscribe(subject, ordered_consumer=True, deliver_policy=DeliverPolicy.ALL)
        letters: list[DeadLetter] = []
        try:
            for _ in range(count):
                msg = await sub.next_msg(timeout=READ_TIMEOUT_S)
                try:
                    letter = codec.decode(msg.data, DeadLetter)
                except InvalidInputError:
                    continue
                letters.append(_with_seq(letter, msg.metadata.sequence.stream))
        finally:
            await sub.unsubscribe()
        return letters

    async def replay(self, req: QueueRequest) -> QueueReplayReply:
        """Publish up to ``req.limit`` dead letters to their queue again (same job id), then remove them."""
        env, name = _names(req)
        replayed: list[str] = []
        for letter in await self._letters(env, name, req.limit):
            await self.js.publish(
                subjects.queue(env, name),
                letter.data,
                headers={HDR_JOB_ID: letter.job_id, HDR_MSG_ID: f"{letter.job_id}-replay-{letter.seq}"},
            )
            await self.js.delete_msg(subjects.STREAM_DEAD_LETTERS, letter.seq)
            replayed.append(letter.job_id)
        return QueueReplayReply(replayed=replayed)


def _with_seq(letter: DeadLetter, seq: int) -> DeadLetter:
    fields: dict[str, Any] = {f: getattr(letter, f) for f in letter.__struct_fields__}
    fields["seq"] = seq
    return DeadLetter(**fields)


class StorageApi:
    """Presigned URLs for ``df.storage`` on the stack's bucket (platform prefixes excluded)."""

    def __init__(self, blobs: S3BlobStore) -> None:
        self.blobs = blobs

    def _check(self, req: StorageRequest, *, prefix: bool = False) -> str:
        bucket = req.bucket or self.blobs.bucket
        if bucket != self.blobs.bucket:
            raise InvalidInputError(
                f"df.storage reaches the stack's bucket {self.blobs.bucket!r} only, not {bucket!r}",
                details={"bucket": bucket},
            )
        key = req.key
        if (key or not prefix) and (not _KEY.match(key) or key.startswith("/") or ".." in key.split("/")):
            raise InvalidInputError(f"invalid object key {key!r}", details={"key": key})
        if key.startswith(RESERVED_PREFIXES):
            raise InvalidInputError(f"keys under {', '.join(RESERVED_PREFIXES)} belong to the platform: {key!r}")
        return bucket

    async def url(self, req: StorageRequest) -> StorageReply:
        """A GET or PUT URL of one object, or (``head``) whether it exists."""
        bucket = self._check(req)
        if req.op == "put":
            return StorageReply(bucket=bucket, url=await self.blobs.presign_put(req.key, STORAGE_URL_TTL_S))
        exists = await self.blobs.exists(req.key)
        if req.op == "head":
            return StorageReply(bucket=bucket, exists=exists)
        if req.op != "get":
            raise InvalidInputError(f"storage op must be get, put or head, not {req.op!r}")
        if not exists:
            raise NotFoundError(f"no object s3://{bucket}/{req.key}", details={"key": req.key})
        return StorageReply(bucket=bucket, url=await self.blobs.presign_get(req.key, STORAGE_URL_TTL_S), exists=True)

    async def list(self, req: StorageRequest) -> StorageReply:
        """Keys under a prefix (recursive, sorted), platform prefixes left out."""
        bucket = self._check(req, prefix=True)
        limit = max(0, min(req.limit, MAX_LIST))

        def run() -> list[str]:
            keys: list[str] = []
            for obj in self.blobs.client.list_objects(bucket, prefix=req.key or None, recursive=True):
                name = str(obj.object_name)
                if name.startswith(RESERVED_PREFIXES):
                    continue
                keys.append(name)
                if len(keys) >= limit:
                    break
            return keys

        return StorageReply(bucket=bucket, keys=await asyncio.to_thread(run), exists=True)


def routes(js: JetStreamContext, blobs: S3BlobStore) -> list[Route]:
    """The queue and storage control subjects."""
    queues = QueueApi(js)
    storage = StorageApi(blobs)
    return [
        Route(subjects.API_QUEUE_INSPECT, QueueRequest, queues.inspect),
        Route(subjects.API_QUEUE_DEAD, QueueRequest, queues.dead),
        Route(subjects.API_QUEUE_REPLAY, QueueRequest, queues.replay, concurrent=True),
        Route(subjects.API_STORAGE_URL, StorageRequest, storage.url, concurrent=True),
        Route(subjects.API_STORAGE_LIST, StorageRequest, storage.list, concurrent=True),
    ]

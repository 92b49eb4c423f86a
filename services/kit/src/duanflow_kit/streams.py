"""JetStream streams and KV buckets, created idempotently by whichever service starts first."""

from __future__ import annotations

from duanflow_proto import subjects
from nats.js import JetStreamContext
from nats.js.api import DiscardPolicy, RetentionPolicy, StorageType, StreamConfig
from nats.js.errors import BucketNotFoundError

DAY = 24 * 3600


def stream_configs(replicas: int = 1) -> list[StreamConfig]:
    """The platform's streams (replicas: 3 on a cluster)."""
    return [
        StreamConfig(
            name=subjects.STREAM_INVOCATIONS,
            subjects=[subjects.INV_ALL],
            retention=RetentionPolicy.WORK_QUEUE,
            storage=StorageType.FILE,
            num_replicas=replicas,
            max_msg_size=2 * 1024 * 1024,
            max_age=DAY,
        ),
        StreamConfig(
            name=subjects.STREAM_QUEUES,
            subjects=[subjects.QUEUE_ALL],
            retention=RetentionPolicy.WORK_QUEUE,
            storage=StorageType.FILE,
            num_replicas=replicas,
            max_msg_size=2 * 1024 * 1024,
        ),
        StreamConfig(
            name=subjects.STREAM_DEAD_LETTERS,
            subjects=[subjects.DLQ_ALL],
            retention=RetentionPolicy.LIMITS,
            storage=StorageType.FILE,
            num_replicas=replicas,
            max_age=30 * DAY,
        ),
        StreamConfig(
            name=subjects.STREAM_LOGS,
            subjects=[subjects.LOGS_ALL],
            retention=RetentionPolicy.LIMITS,
            storage=StorageType.FILE,
            num_replicas=replicas,
            max_age=DAY,
            max_bytes=1024 * 1024 * 1024,
            discard=DiscardPolicy.OLD,
        ),
        StreamConfig(
            name=subjects.STREAM_EVENTS,
            subjects=[subjects.EVENTS_ALL],
            retention=RetentionPolicy.LIMITS,
            storage=StorageType.FILE,
            num_replicas=replicas,
            max_age=7 * DAY,
        ),
    ]


KV_TTLS: dict[str, float] = {
    subjects.KV_CAPACITY: 10.0,
    subjects.KV_ROUTES: 0,
    subjects.KV_RESULTS: DAY,
    subjects.KV_CANCELS: DAY,
    subjects.KV_PRICES: 0,
    subjects.KV_LEADER: 10.0,
}


async def ensure_streams(js: JetStreamContext, replicas: int = 1) -> None:
    """Create or update every stream and KV bucket."""
    for cfg in stream_configs(replicas):
        try:
            await js.add_stream(cfg)
        except Exception:
            await js.update_stream(cfg)
    for bucket, ttl in KV_TTLS.items():
        try:
            await js.key_value(bucket)
        except BucketNotFoundError:
            from nats.js.api import KeyValueConfig

            await js.create_key_value(KeyValueConfig(bucket=bucket, ttl=ttl or None, replicas=replicas))

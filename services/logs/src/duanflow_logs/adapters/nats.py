"""The log service's durable pull consumer on the logs stream."""

from __future__ import annotations

from typing import Any

from duanflow_proto import subjects
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

ACK_WAIT_S = 30.0
MAX_DELIVER = 20


async def logs_subscription(js: JetStreamContext, consumer: str, filter_subject: str, batch_size: int) -> Any:
    """Pull subscription on the durable ``consumer`` of the logs stream (created on first use, shared by instances)."""
    config = ConsumerConfig(
        durable_name=consumer,
        filter_subject=filter_subject,
        ack_policy=AckPolicy.EXPLICIT,
        deliver_policy=DeliverPolicy.ALL,
        ack_wait=ACK_WAIT_S,
        max_deliver=MAX_DELIVER,
        max_ack_pending=batch_size * 8,
    )
    return await js.pull_subscribe(filter_subject, durable=consumer, stream=subjects.STREAM_LOGS, config=config)

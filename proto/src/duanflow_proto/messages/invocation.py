"""Invocations of functions and their results."""

from __future__ import annotations

import msgspec

from duanflow_proto.messages.common import ErrorReply

CODEC_CLOUDPICKLE = "cloudpickle"
CODEC_JSON = "json"
CODEC_BYTES = "bytes"
"""A result that is raw bytes (an endpoint returning ``bytes`` to an HTTP caller)."""

# Headers carried by invocation messages (the JetStream reply field is taken by acks).
HDR_REPLY = "Df-Reply"
HDR_CALL_ID = "Df-Call"
HDR_DEADLINE = "Df-Deadline"
HDR_TRACEPARENT = "traceparent"
HDR_BUSY = "Df-Busy"
"""Header of a replica's empty answer to a direct call it cannot take now (all slots busy, draining)."""

HEARTBEAT_S = 0.5
"""Interval of the heartbeats a replica sends while one HTTP (``json``-codec) call runs (the first after one)."""


class Invocation(msgspec.Struct, frozen=True, kw_only=True, tag="duanflow.v1.inv.invocation", tag_field="type"):
    """One call of one function, published to the invocations stream."""

    call_id: str
    """Unique id of this call (``fc-...``)."""
    function: str
    """Function name within the app."""
    args: bytes = b""
    """Serialized ``(args, kwargs)``; empty when ``payload_ref`` is set."""
    codec: str = CODEC_CLOUDPICKLE
    """How ``args`` is encoded: ``cloudpickle`` (Python callers) or ``json`` (HTTP)."""
    payload_ref: str | None = None
    """S3 key of the arguments when they were too large to travel inline."""
    deadline_ms: int = 0
    """Epoch milliseconds after which the caller no longer waits (0: none)."""
    attempt: int = 1
    """Attempt number, starting at 1."""
    python: str = ""
    """Caller's Python ``major.minor``, to explain unpickling failures."""
    keep_result: bool = False
    """Store the result in the results bucket (``.spawn()``)."""
    method: str = ""
    """For lifecycle classes (``@app.cls``): the method to run on the replica's instance."""


class Result(msgspec.Struct, frozen=True, kw_only=True, tag="duanflow.v1.inv.result", tag_field="type"):
    """The outcome of one invocation, published to the caller's inbox."""

    call_id: str
    """Id of the call this answers."""
    ok: bool
    """True when ``value`` holds the return value, false when ``error`` is set."""
    value: bytes = b""
    """Serialized return value (same codec as the invocation)."""
    codec: str = CODEC_CLOUDPICKLE
    """How ``value`` is encoded."""
    payload_ref: str | None = None
    """S3 key of the value when it was too large to travel inline."""
    error: ErrorReply | None = None
    """The error, when ``ok`` is false."""
    replica_id: str = ""
    """Replica that ran the call."""
    simulated_gpu: bool = False
    """True when the replica ran on a simulated GPU inventory."""
    duration_us: int = 0
    """Execution time inside the replica."""
    seq: int = 0
    """Position of this message among the messages of one call (chunks of a stream, heartbeats), from 0."""
    final: bool = True
    """False on every message of a call but its last (stream chunks still coming, heartbeats)."""
    stream: bool = False
    """True when ``value`` is one chunk of a streamed (generator) result."""
    heartbeat: bool = False
    """True when this message only says the call is still running on ``replica_id`` (``value`` empty)."""
    status: int = 0
    """HTTP status the endpoint asked for (``df.Response``; 0: the gateway's default)."""
    headers: dict[str, str] = {}
    """HTTP response headers the endpoint asked for (``df.Response``)."""
    media_type: str = ""
    """Content type the endpoint asked for (empty: from the value's kind)."""


class InvocationBatch(msgspec.Struct, frozen=True, kw_only=True, tag="duanflow.v1.inv.batch", tag_field="type"):
    """Consecutive inputs of one ``.map()``, carried in one message so small inputs cost one store and one ack.

    The replica answers with one :class:`ResultBatch` on the ``Df-Reply`` subject (core NATS), then acks. A batch
    that runs twice (a replica died before its ack) answers twice: callers keep the first result of each index.
    """

    call_id: str
    """Id of the map call (``fc-...``); results of every batch of the map go to the same reply subject."""
    function: str
    """Function name within the app (``Class.method`` for methods of lifecycle classes)."""
    first_index: int
    """Index of ``inputs[0]`` in the map's inputs."""
    inputs: list[bytes]
    """Each input's serialized ``(args, kwargs)``, in order."""
    codec: str = CODEC_CLOUDPICKLE
    """How each input is encoded."""
    deadline_ms: int = 0
    """Epoch milliseconds after which the caller no longer waits (0: none)."""
    python: str = ""
    """Caller's Python ``major.minor``, to explain unpickling failures."""
    input_refs: dict[int, str] = {}
    """Inputs too large for a message (over ~1 MiB): offset in ``inputs`` → the payload's sha256 (``payload_ref``)
    in S3; ``inputs[offset]`` is then empty."""


class ResultBatch(msgspec.Struct, frozen=True, kw_only=True, tag="duanflow.v1.inv.result_batch", tag_field="type"):
    """The outcomes of an :class:`InvocationBatch`, in input order."""

    call_id: str
    """Id of the map call."""
    first_index: int
    """Index of ``results[0]`` in the map's inputs."""
    results: list[Result]
    """One result per input (``Result.call_id`` is the map's id)."""


class ReplicaLoad(msgspec.Struct, frozen=True, kw_only=True, tag="duanflow.v1.inv.replica_load", tag_field="type"):
    """What an endpoint replica's direct path (``subjects.direct``) is doing, for the router's autoscaler.

    Direct calls never pass the function's consumer, so its backlog and delivered sequence do not show them. Sent
    on ``subjects.replica_load`` every ``LOAD_REPORT_S`` while the replica served a direct call or holds one.
    """

    replica_id: str
    """The reporting replica."""
    env: str
    """Env of its app."""
    app: str
    """Its app."""
    function: str
    """Its function."""
    busy: int = 0
    """Direct calls running on it now."""
    served: int = 0
    """Direct calls it has taken since it started (a counter: a change means activity)."""


LOAD_REPORT_S = 1.0
"""Interval of :class:`ReplicaLoad` reports while a replica's direct path is in use."""


class PayloadUrlRequest(
    msgspec.Struct, frozen=True, kw_only=True, tag="duanflow.v1.inv.payload_url_request", tag_field="type"
):
    """Ask the router for a presigned URL of one large payload (arguments or a result over ~1 MiB).

    Payloads are content-addressed: the key derives from the sha256 digest, which only the payload's sender and
    receiver know, so a URL is never handed out for a payload one cannot name.
    """

    digest: str
    """sha256 hex digest of the payload."""
    size: int = 0
    """Payload size in bytes (for uploads)."""
    upload: bool = False
    """True: a PUT URL (``exists`` when stored already); false: a GET URL."""


class PayloadUrlReply(msgspec.Struct, frozen=True, kw_only=True, tag="duanflow.v1.inv.payload_url", tag_field="type"):
    """Where to PUT or GET one payload."""

    key: str
    """S3 key of the payload."""
    url: str = ""
    """Presigned URL (empty when an upload is not needed)."""
    exists: bool = False
    """True when that payload is stored already: nothing to upload."""

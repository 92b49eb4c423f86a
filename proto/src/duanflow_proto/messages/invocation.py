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

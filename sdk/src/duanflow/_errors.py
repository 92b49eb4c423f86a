"""The SDK's errors: the wire hierarchy of ``duanflow_proto.errors`` plus a few raised only on the client side."""

from __future__ import annotations

from duanflow_proto.errors import (
    CallCancelledError,
    ConflictError,
    DeadlineExceededError,
    DeserializationError,
    DuanFlowError,
    FunctionTimeoutError,
    InternalError,
    InvalidInputError,
    NoCapacityError,
    NoMatchingGpuError,
    NotFoundError,
    PayloadTooLargeError,
    PermissionDeniedError,
    RemoteError,
    UnauthenticatedError,
    UnavailableError,
)

__all__ = [
    "BuildFailedError",
    "CallCancelledError",
    "ConflictError",
    "DeadlineExceededError",
    "DeserializationError",
    "DuanFlowError",
    "FunctionTimeoutError",
    "InternalError",
    "InvalidInputError",
    "InvalidOptionError",
    "NoCapacityError",
    "NoMatchingGpuError",
    "NotFoundError",
    "PayloadTooLargeError",
    "PermissionDeniedError",
    "RemoteError",
    "UnauthenticatedError",
    "UnavailableError",
]


class InvalidOptionError(InvalidInputError, TypeError):
    """A decorator or constructor got an option it does not know, or a value out of range.

    It is also a :class:`TypeError`, as Python's own "unexpected keyword argument" is.
    """


class BuildFailedError(DuanFlowError):
    """The builder could not build the app's image; the message ends with the build log's tail."""

    code = "build_failed"
    http_status = 422

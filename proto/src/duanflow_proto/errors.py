"""The one DuanFlow error hierarchy.

Errors cross the wire as one message type (:class:`duanflow_proto.messages.common.ErrorReply`) and are
turned back into the same class by :func:`from_reply`. Each class declares a code, an HTTP status and
whether a retry can help.
"""

from __future__ import annotations

from typing import Any, ClassVar

from duanflow_proto.messages.common import ErrorReply


class DuanFlowError(Exception):
    """Root of every DuanFlow error."""

    code: ClassVar[str] = "internal"
    http_status: ClassVar[int] = 500
    retryable: ClassVar[bool] = False

    def __init__(self, message: str, *, details: dict[str, str] | None = None, traceback: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details: dict[str, str] = dict(details or {})
        self.remote_traceback = traceback

    def to_reply(self) -> ErrorReply:
        """This error as its wire message."""
        return ErrorReply(
            code=self.code,
            message=self.message,
            retryable=self.retryable,
            http_status=self.http_status,
            details=self.details,
            traceback=self.remote_traceback,
        )

    def __str__(self) -> str:
        return self.message


class InvalidInputError(DuanFlowError):
    """The request is malformed or a value is out of range."""

    code = "invalid_input"
    http_status = 400


class NotFoundError(DuanFlowError):
    """The named app, function, release, secret or object does not exist."""

    code = "not_found"
    http_status = 404


class ConflictError(DuanFlowError):
    """The request conflicts with the current state (already running, route taken, ...)."""

    code = "conflict"
    http_status = 409


class PermissionDeniedError(DuanFlowError):
    """The caller is not allowed to do this."""

    code = "permission_denied"
    http_status = 403


class UnauthenticatedError(DuanFlowError):
    """No or wrong credentials."""

    code = "unauthenticated"
    http_status = 401


class PayloadTooLargeError(DuanFlowError):
    """The payload is over the size limit."""

    code = "payload_too_large"
    http_status = 413


class UnavailableError(DuanFlowError):
    """A component is not reachable or has no capacity right now; retrying later can help."""

    code = "unavailable"
    http_status = 503
    retryable = True


class NoCapacityError(UnavailableError):
    """The spec fits the fleet but no capacity is free now."""

    code = "no_capacity"


class NoMatchingGpuError(InvalidInputError):
    """No pool in the fleet could ever satisfy the GPU spec."""

    code = "no_matching_gpu"
    http_status = 422


class DeadlineExceededError(DuanFlowError):
    """A deadline passed."""

    code = "timeout"
    http_status = 504
    retryable = True


class FunctionTimeoutError(DeadlineExceededError):
    """The function ran past its timeout."""

    code = "function_timeout"


class CallCancelledError(DuanFlowError):
    """The call was cancelled (``FunctionCall.cancel()``) before it finished."""

    code = "cancelled"
    http_status = 409


class RemoteError(DuanFlowError):
    """The user's function raised; the remote traceback is attached."""

    code = "remote_error"
    http_status = 500


class DeserializationError(DuanFlowError):
    """A payload could not be decoded (for example pickled by another Python version)."""

    code = "deserialization_error"
    http_status = 400


class InternalError(DuanFlowError):
    """A bug in DuanFlow itself."""

    code = "internal"


_BY_CODE: dict[str, type[DuanFlowError]] = {}


def _register(cls: type[DuanFlowError]) -> None:
    _BY_CODE[cls.code] = cls
    for sub in cls.__subclasses__():
        _register(sub)


_register(DuanFlowError)


def error_classes() -> dict[str, type[DuanFlowError]]:
    """Every error class by its code."""
    return dict(_BY_CODE)


def from_reply(reply: ErrorReply) -> DuanFlowError:
    """Turn a wire error back into its class (unknown codes become :class:`InternalError`)."""
    cls = _BY_CODE.get(reply.code, InternalError)
    err = cls(reply.message, details=dict(reply.details), traceback=reply.traceback)
    return err


def wrap(exc: BaseException) -> DuanFlowError:
    """Any exception as a DuanFlowError (unknown ones become :class:`InternalError`)."""
    if isinstance(exc, DuanFlowError):
        return exc
    return InternalError(f"{type(exc).__name__}: {exc}")


def details(**values: Any) -> dict[str, str]:
    """Structured error fields as strings."""
    return {k: str(v) for k, v in values.items() if v is not None}

"""What the gateway's request path needs from the outside world, as Protocols (adapters implement them)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

from duanflow_proto.messages.invocation import Invocation, Result
from duanflow_proto.messages.logs import LogLine

from duanflow_gateway.domain import RouteTable


class Invoker(Protocol):
    """Sends one invocation to its function's replicas and waits for the result."""

    async def invoke(
        self,
        subject: str,
        invocation: Invocation,
        timeout_s: float,
        trace_parent: Mapping[str, str] | None = None,
        *,
        direct: str = "",
    ) -> Result:
        """Publish ``invocation`` on ``subject`` and return its result.

        ``trace_parent``: headers of the incoming request whose W3C trace context the invocation continues.
        ``direct``: the core subject of the function's warm replicas (``subjects.direct``), tried first; the call
        goes to ``subject`` when no replica there takes it at once.

        Raises :class:`~duanflow_proto.errors.DeadlineExceededError` when no result came within ``timeout_s`` and
        :class:`~duanflow_proto.errors.UnavailableError` when the invocations stream cannot take it.
        """

    async def next(self, call_id: str) -> Result:
        """The next message of a call whose first answer opened a stream (``stream`` and not ``final``)."""

    def close(self, call_id: str) -> None:
        """Forget an open call (a finished stream, or a client that went away)."""


class Routes(Protocol):
    """The live route table."""

    @property
    def table(self) -> RouteTable:
        """The current table (replaced or updated as the routes bucket changes)."""


class RequestLog(Protocol):
    """Where the ``request`` log lines of served calls go."""

    async def publish(self, line: LogLine) -> None:
        """Send one line; never raises (a lost log line must not fail the request)."""

"""NATS transport of the builder: decode → :class:`duanflow_builder.domain.Builder` → encode. No rules here."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from duanflow_kit.handlers import handle
from duanflow_kit.service import Service
from duanflow_proto import subjects
from duanflow_proto.errors import UnavailableError
from duanflow_proto.messages.build import BuildRequest, BuildResult
from faststream.nats import NatsMessage

from duanflow_builder.domain import Builder


def register(svc: Service, get_builder: Callable[[], Builder | None], *, max_workers: int) -> None:
    """Answer ``BuildRequest``s on ``subjects.BUILD_START`` (queue group: instances share the work)."""

    async def build(req: BuildRequest) -> BuildResult:
        builder = get_builder()
        if builder is None:
            raise UnavailableError("the builder is starting: retry shortly")
        return await builder.build(req)

    async def on_build_start(msg: NatsMessage) -> bytes:
        return await handle(msg.body, BuildRequest, build, subject=subjects.BUILD_START)

    sub: Callable[[Callable[[NatsMessage], Awaitable[bytes]]], object] = svc.broker.subscriber(
        subjects.BUILD_START, queue=svc.name, max_workers=max(1, max_workers)
    )
    sub(on_build_start)

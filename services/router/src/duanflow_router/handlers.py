"""Transport only: wire the control-plane use cases to NATS subjects. No rules here."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from duanflow_kit.handlers import handle
from duanflow_kit.service import Service
from duanflow_proto import codec, subjects
from duanflow_proto.errors import InvalidInputError
from duanflow_proto.messages.agent import CapacityReport, FleetReply
from duanflow_proto.messages.common import HealthRequest
from duanflow_proto.messages.release import (
    DeployReply,
    DeployRequest,
    FunctionLookup,
    FunctionRef,
    ReleaseList,
    ReleaseListRequest,
    UploadUrlReply,
    UploadUrlRequest,
)
from faststream.nats import NatsMessage
from nats.aio.msg import Msg

from duanflow_router.control import ControlPlane

log = logging.getLogger("duanflow.router.handlers")

DEPLOY_WORKERS = 8


def register(service: Service, control: Callable[[], ControlPlane]) -> None:
    """Register the router's request/reply handlers (queue group ``router``) on ``service``.

    ``control`` returns the control plane built by the lifespan (handlers run only after it).
    """

    @service.request(subjects.API_BUNDLE_UPLOAD, UploadUrlRequest)
    async def bundle_upload_url(req: UploadUrlRequest) -> UploadUrlReply:
        return await control().upload_url(req)

    async def deploy(req: DeployRequest) -> DeployReply:
        return await control().deploy(req)

    async def on_deploy(msg: NatsMessage) -> bytes:
        return await handle(msg.body, DeployRequest, deploy, subject=subjects.API_DEPLOY)

    # A deploy waits for its replicas to be ready (minutes at worst): other apps' deploys run meanwhile.
    subscriber: Callable[[Callable[[NatsMessage], Awaitable[bytes]]], object] = service.broker.subscriber(
        subjects.API_DEPLOY, queue=service.name, max_workers=DEPLOY_WORKERS
    )
    subscriber(on_deploy)

    @service.request(subjects.API_RELEASES, ReleaseListRequest)
    async def releases(req: ReleaseListRequest) -> ReleaseList:
        return await control().releases(req)

    @service.request(subjects.API_FUNCTION_LOOKUP, FunctionLookup)
    async def function_lookup(req: FunctionLookup) -> FunctionRef:
        return await control().lookup(req)

    @service.request(subjects.API_FLEET, HealthRequest)
    async def fleet(req: HealthRequest) -> FleetReply:
        return await control().fleet_view()


class CapacityListener:
    """Plain (non-queue) subscriber to every agent's capacity reports: each router instance needs the view."""

    def __init__(self, control: ControlPlane) -> None:
        self.control = control
        self._warned: set[str] = set()

    def _drop(self, subject: str, why: str) -> None:
        # Log once per subject: a misbehaving agent beats every few seconds and must not flood the log.
        if subject not in self._warned:
            self._warned.add(subject)
            log.warning("dropping capacity report on %s: %s", subject, why)

    async def on_message(self, msg: Msg) -> None:
        """Decode one report and hand it to the control plane; garbage is logged once and dropped."""
        try:
            report = codec.decode(msg.data, CapacityReport)
            expected = subjects.capacity(report.agent_id)
        except (InvalidInputError, ValueError) as exc:
            self._drop(msg.subject, str(exc))
            return
        if expected != msg.subject:
            self._drop(msg.subject, f"agent id {report.agent_id!r} does not match the subject")
            return
        try:
            await self.control.observe_capacity(report)
        except Exception as exc:
            log.warning("could not store capacity report of %s: %s", report.agent_id, exc)

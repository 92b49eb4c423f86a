"""Transport only: wire the control-plane use cases to NATS subjects. No rules here."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import msgspec
from duanflow_kit import telemetry
from duanflow_kit.handlers import handle
from duanflow_kit.service import ERROR_TAG
from duanflow_proto import codec, subjects
from duanflow_proto.errors import InvalidInputError, UnavailableError
from duanflow_proto.messages.agent import CapacityReport, FleetReply
from duanflow_proto.messages.common import HealthRequest
from duanflow_proto.messages.invocation import PayloadUrlRequest, ReplicaLoad
from duanflow_proto.messages.price import PriceList, PriceUpdate
from duanflow_proto.messages.release import (
    AppStopRequest,
    DeployRequest,
    FunctionLookup,
    ReleaseListRequest,
    UploadUrlRequest,
)
from duanflow_proto.messages.secret import SecretCreateRequest, SecretDeleteRequest, SecretListRequest
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg

from duanflow_router.autoscale import DirectLoads
from duanflow_router.control import ControlPlane
from duanflow_router.replica_setup import ReplicaSetup

log = logging.getLogger("duanflow.router.handlers")

DEPLOY_WORKERS = 8


@dataclass(frozen=True)
class Route:
    """One control-API subject, its request type and its use case."""

    subject: str
    req_type: type[Any]
    call: Callable[[Any], Awaitable[msgspec.Struct]]
    concurrent: bool = False
    """Answer several requests at once (deploys wait minutes for replicas: other apps' deploys run meanwhile)."""


def routes(control: Callable[[], ControlPlane]) -> list[Route]:
    """The router's control API. ``control`` returns the control plane built by the lifespan."""

    async def fleet(req: HealthRequest) -> FleetReply:
        return await control().fleet_view()

    async def prices(req: HealthRequest) -> PriceList:
        return control().price_list()

    return [
        Route(subjects.API_BUNDLE_UPLOAD, UploadUrlRequest, lambda r: control().upload_url(r)),
        Route(subjects.API_PAYLOAD_URL, PayloadUrlRequest, lambda r: control().payload_url(r)),
        Route(subjects.API_DEPLOY, DeployRequest, lambda r: control().deploy(r), concurrent=True),
        Route(subjects.API_RELEASES, ReleaseListRequest, lambda r: control().releases(r)),
        Route(subjects.API_FUNCTION_LOOKUP, FunctionLookup, lambda r: control().lookup(r)),
        Route(subjects.API_FLEET, HealthRequest, fleet),
        Route(subjects.API_PRICE_SET, PriceUpdate, lambda r: control().set_price(r)),
        Route(subjects.API_PRICE_LIST, HealthRequest, prices),
        *secret_routes(control),
    ]


def secret_routes(control: Callable[[], ControlPlane]) -> list[Route]:
    """Secrets (create, list, delete) and ``duanflow stop``: served once the replica setup is attached."""

    def setup() -> ReplicaSetup:
        got = control().setup
        if got is None:
            raise UnavailableError("the router is starting: retry shortly")
        return got

    return [
        Route(subjects.API_SECRET_CREATE, SecretCreateRequest, lambda r: setup().secrets.create(r)),
        Route(subjects.API_SECRET_LIST, SecretListRequest, lambda r: setup().secrets.list(r)),
        Route(subjects.API_SECRET_DELETE, SecretDeleteRequest, lambda r: setup().secrets.delete(r)),
        Route(subjects.API_APP_STOP, AppStopRequest, lambda r: control().stop_app(r), concurrent=True),
    ]


class LeaderApi:
    """Serves the control API in queue group ``router`` only while this instance holds the leader lease.

    A standby answers health requests and keeps its fleet view warm, but takes no control calls: with one
    active router, placements never race between instances.
    """

    def __init__(self, nc: NatsClient, api: list[Route], tasks: asyncio.TaskGroup) -> None:
        self.nc = nc
        self.api = api
        self.tasks = tasks
        self._subs: list[Any] = []
        self._slots = asyncio.Semaphore(DEPLOY_WORKERS)

    @property
    def serving(self) -> bool:
        """Whether the API is subscribed."""
        return bool(self._subs)

    async def start(self) -> None:
        """Subscribe every route (idempotent)."""
        if self._subs:
            return
        for route in self.api:
            self._subs.append(await self.nc.subscribe(route.subject, queue="router", cb=self._callback(route)))
        # The server has every subscription before this router says it leads: a request sent the moment it does
        # must find a responder.
        await self.nc.flush()

    async def stop(self) -> None:
        """Unsubscribe (in-flight requests still get their answers)."""
        subs, self._subs = self._subs, []
        for sub in subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    def _callback(self, route: Route) -> Callable[[Msg], Awaitable[None]]:
        async def answer(msg: Msg) -> None:
            try:
                started = time.perf_counter()
                # the caller's trace continues here (and onward, e.g. into the StartReplica sent to an agent)
                with telemetry.handler_span(msg.headers, route.subject):
                    reply = await handle(msg.data, route.req_type, route.call, subject=route.subject)
                ok = ERROR_TAG not in reply
                telemetry.metrics().observe("router", route.subject, time.perf_counter() - started, ok)
                if msg.reply:
                    await msg.respond(reply)
            except Exception as exc:  # a lost connection must not kill the subscription
                log.warning("could not answer %s: %s", route.subject, exc)

        async def bounded(msg: Msg) -> None:
            async with self._slots:
                await answer(msg)

        async def callback(msg: Msg) -> None:
            if route.concurrent:
                self.tasks.create_task(bounded(msg))
            else:
                await answer(msg)

        return callback


class _DropsOnce:
    """A listener of periodic reports that logs a dropped one once per subject: a misbehaving sender repeats every
    few seconds and must not flood the log."""

    what = "report"

    def __init__(self) -> None:
        self._warned: set[str] = set()

    def _drop(self, subject: str, why: str) -> None:
        if subject not in self._warned:
            self._warned.add(subject)
            log.warning("dropping %s on %s: %s", self.what, subject, why)


class CapacityListener(_DropsOnce):
    """Plain (non-queue) subscriber to every agent's capacity reports: each router instance needs the view."""

    what = "capacity report"

    def __init__(self, control: ControlPlane) -> None:
        super().__init__()
        self.control = control

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


class PriceListener:
    """Plain (non-queue) subscriber to the price feed: every router instance applies every price at once."""

    def __init__(self, control: ControlPlane) -> None:
        self.control = control

    async def on_message(self, msg: Msg) -> None:
        """Decode one ``PriceUpdate``; the pool comes from the subject when the message names none."""
        try:
            update = codec.decode(msg.data, PriceUpdate)
            if not update.pool:
                update = msgspec.structs.replace(update, pool=msg.subject.rsplit(".", 1)[-1])
            if subjects.price(update.pool) != msg.subject or update.price_per_gpu_hour < 0:
                raise InvalidInputError(f"price update for {update.pool!r} on {msg.subject}")
        except (InvalidInputError, ValueError) as exc:
            log.warning("dropping price update on %s: %s", msg.subject, exc)
            return
        self.control.apply_price(update)


class ReplicaLoadListener(_DropsOnce):
    """Plain subscriber to the endpoint replicas' direct-path reports (every router keeps the view; the leader's
    autoscaler reads it). Garbage is logged once per subject and dropped.

    With ``known``, a report is kept only when it names a replica this router started for that function: another
    app's replica cannot keep an app warm or scale it with made-up reports, nor grow the view without bound.
    """

    what = "replica load report"

    def __init__(
        self,
        loads: DirectLoads,
        clock: Callable[[], float] = time.monotonic,
        known: Callable[[str, str, str, str], bool] | None = None,
    ) -> None:
        super().__init__()
        self.loads = loads
        self.clock = clock
        self.known = known
        self.unknown = 0
        """Reports ignored because they named no replica of their function (a replica's first report can come
        before its start is recorded; the next one, a second later, counts)."""

    async def on_message(self, msg: Msg) -> None:
        """Decode one report and record it."""
        try:
            load = codec.decode(msg.data, ReplicaLoad)
            expected = subjects.replica_load(load.env, load.app, load.function)
        except (InvalidInputError, ValueError) as exc:
            self._drop(msg.subject, str(exc))
            return
        if expected != msg.subject:
            self._drop(msg.subject, f"it names {expected}")
            return
        if self.known is not None and not self.known(load.replica_id, load.env, load.app, load.function):
            self.unknown += 1
            return
        self.loads.observe(load, self.clock())

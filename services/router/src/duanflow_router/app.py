"""Wiring of the router process: the kit Service, its handlers, and a lifespan owning every resource."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from duanflow_kit import telemetry
from duanflow_kit.service import Service, stop_tasks
from duanflow_kit.streams import ensure_streams
from duanflow_proto import subjects

from duanflow_router import handlers, jobs, metrics, queues
from duanflow_router.adapters.crypto import AesGcmSealer
from duanflow_router.adapters.nats import NatsAgentClient, NatsLease, NatsPlatform, NatsWakeups
from duanflow_router.adapters.postgres import PostgresReleaseStore, open_pool
from duanflow_router.adapters.s3 import S3BlobStore
from duanflow_router.adapters.secrets_pg import PostgresAppSwitch, PostgresSecretStore
from duanflow_router.autoscale import Autoscaler, DirectLoads
from duanflow_router.control import ControlPlane
from duanflow_router.ports import Lease
from duanflow_router.replica_setup import ReplicaSetup
from duanflow_router.secrets import Secrets
from duanflow_router.settings import Settings

log = logging.getLogger("duanflow.router")

POOL_CLOSE_TIMEOUT_S = 10.0
"""How long shutdown waits for Postgres connections to come back before it closes them anyway."""

GC_THRESHOLDS = (50_000, 20, 100)


def tune_gc() -> None:
    """Keep the garbage collector off the decision path.

    The fleet index is a large, long-lived object graph: full collections that walk it stall decisions for
    milliseconds. Freezing what exists after the fleet is loaded moves it out of the collector's way, and a
    larger first threshold makes collections rarer (the technique CPython documents for ``gc.freeze``).
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


class RouterApp:
    """The router service: :attr:`service` with handlers registered; :attr:`control` once started.

    Every instance keeps the fleet view and live prices; only the holder of the leader lease serves the
    control API and sweeps for dead agents. A standby takes over once the active router's lease lapses
    (``lease_ttl_s`` after it stopped renewing), rebuilding its state from Postgres and the KV buckets.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.service = Service("router", settings)
        self._control: ControlPlane | None = None
        self.jobs: jobs.Jobs | None = None
        """Long GPU jobs (``@app.job``), once started."""
        self.autoscaler: Autoscaler | None = None
        """Scales functions on the leader (:mod:`duanflow_router.autoscale`); set once started."""
        self.leader = False
        self.service.health_checks.append(self._health)

    def control(self) -> ControlPlane:
        """The control plane (only between start-up and shutdown)."""
        if self._control is None:
            raise RuntimeError("router not started")
        return self._control

    async def _health(self) -> dict[str, str]:
        if self._control is None:
            return {"state": "starting"}
        details = await self._control.health()
        details["role"] = "leader" if self.leader else "standby"
        return details

    async def _step(self, control: ControlPlane, lease: Lease, api: handlers.LeaderApi) -> None:
        """One tick: renew (or try to take) the lease; serve the API and sweep while holding it."""
        me = self.service.instance
        if self.leader:
            self.leader = await lease.renew(me)
            if not self.leader:
                log.error("lost the leader lease: standing by")
                await api.stop()
        elif await lease.acquire(me):
            log.info("took the leader lease (%s): rebuilding state", me)
            await control.load()
            if self.jobs is not None:
                await self.jobs.load()
            tune_gc()
            await api.start()
            self.leader = True
        if self.leader:
            await control.sweep()
            if self.jobs is not None:
                await self.jobs.tick()

    async def _lead(self, control: ControlPlane, lease: Lease, api: handlers.LeaderApi) -> None:
        """Hold (or wait for) the lease for as long as the service runs."""
        while True:
            await asyncio.sleep(self.settings.tick_s)
            try:
                await self._step(control, lease, api)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a NATS or Postgres hiccup: try again next tick
                log.warning("leader loop: %s: %s", type(exc).__name__, exc)

    @asynccontextmanager
    async def lifespan(self, service: Service) -> AsyncIterator[None]:
        """Open Postgres (migrated), S3 (bucket ensured), streams; listen to capacity and prices; lead or stand by."""
        s = self.settings
        pool: Any = await open_pool(s.database_url, s.schema)
        try:
            blobs = S3BlobStore(
                s.s3_endpoint,
                s.s3_access_key,
                s.s3_secret_key,
                s.s3_bucket,
                secure=s.s3_secure,
                public_endpoint=s.s3_public_endpoint,
            )
            await blobs.ensure_bucket()
            await ensure_streams(service.js)
            platform = NatsPlatform(service.js, service.nc)
            gauges = metrics.router_metrics(telemetry.metrics())
            platform.on_consumer_info = gauges.depths.record_info  # the autoscaler's reads feed the depth gauges
            control = ControlPlane(
                PostgresReleaseStore(pool),
                blobs,
                NatsAgentClient(service.nc),
                platform,
                start_timeout_s=s.start_timeout_s,
                capacity_wait_s=s.capacity_wait_s,
            )
            control.setup = ReplicaSetup(
                Secrets(PostgresSecretStore(pool), AesGcmSealer(s.secret_key) if s.secret_key else None),
                blobs,
                PostgresAppSwitch(pool),
                docker_registry=s.docker_registry,
            )
            for update in await control.platform.stored_prices():
                control.apply_price(update)
            self.jobs = jobs.Jobs(control, jobs.PostgresJobStore(pool), service.js)
            job_events = jobs.JobEventListener(self.jobs, lambda: self.leader)
            capacity = handlers.CapacityListener(control)
            prices = handlers.PriceListener(control)
            direct = DirectLoads()
            direct_loads = handlers.ReplicaLoadListener(direct, known=control.runs)
            subs = [
                await service.nc.subscribe(subjects.CAPACITY_ALL, cb=capacity.on_message),
                await service.nc.subscribe(subjects.LOAD_ALL, cb=direct_loads.on_message),
                await service.nc.subscribe(subjects.PRICE_ALL, cb=prices.on_message),
                await service.nc.subscribe(subjects.JOB_EVENTS_ALL, cb=job_events.on_message),
            ]
            self._control = control
            gauges.attach(control)
            lease = NatsLease(service.js, key=s.schema)
            try:
                async with asyncio.TaskGroup() as tasks:
                    api = handlers.LeaderApi(
                        service.nc,
                        [
                            *handlers.routes(self.control),
                            *queues.routes(service.js, blobs),
                            *jobs.routes(lambda: self.jobs),
                        ],
                        tasks,
                    )
                    # A lone router leads (and serves the API) before its health check answers.
                    await self._step(control, lease, api)
                    leading = tasks.create_task(self._lead(control, lease, api))
                    self.autoscaler = Autoscaler(
                        control,
                        PostgresReleaseStore(pool),
                        control.platform,
                        NatsWakeups(service.nc),
                        interval_s=s.autoscale_interval_s,
                        idle_window_s=s.idle_window_s,
                        max_starts=s.autoscale_max_starts,
                        direct=direct,
                    )
                    scaling = tasks.create_task(self.autoscaler.run(lambda: self.leader))
                    depths = (
                        tasks.create_task(metrics.poll_depths(service.js, gauges.depths, s.queue_metrics_interval_s))
                        if s.metrics_port
                        else None
                    )
                    log.info("router ready (schema %s, bucket %s)", s.schema, s.s3_bucket)
                    try:
                        yield
                    finally:
                        await stop_tasks(leading, scaling, depths)
                        await self.jobs.stop()
                        await api.stop()
                        if self.leader:
                            with contextlib.suppress(Exception):
                                await lease.release(service.instance)
                        self.leader = False
            finally:
                self._control = None
                gauges.attach(None)
                for sub in subs:
                    with contextlib.suppress(Exception):
                        await sub.unsubscribe()
        finally:
            try:
                # Graceful close waits for every connection to come back, with no limit of its own: a task that
                # still holds one (cancelled but not yet unwound) must not keep the router from stopping.
                await asyncio.wait_for(pool.close(), POOL_CLOSE_TIMEOUT_S)
            except TimeoutError:
                log.warning("Postgres connections still in use %gs into shutdown: closing them", POOL_CLOSE_TIMEOUT_S)
                pool.terminate()

    async def run(self) -> None:
        """Run until SIGTERM/SIGINT."""
        await self.service.run(self.lifespan)


def build_app(settings: Settings) -> RouterApp:
    """The router service for ``settings``, ready to :meth:`RouterApp.run`."""
    return RouterApp(settings)

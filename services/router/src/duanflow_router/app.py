"""Wiring of the router process: the kit Service, its handlers, and a lifespan owning every resource."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from duanflow_kit.service import Service
from duanflow_kit.streams import ensure_streams
from duanflow_proto import subjects

from duanflow_router import handlers
from duanflow_router.adapters.nats import NatsAgentClient, NatsPlatform
from duanflow_router.adapters.postgres import PostgresReleaseStore, open_pool
from duanflow_router.adapters.s3 import S3BlobStore
from duanflow_router.control import ControlPlane
from duanflow_router.settings import Settings

log = logging.getLogger("duanflow.router")


class RouterApp:
    """The router service: :attr:`service` with handlers registered; :attr:`control` once started."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.service = Service("router", settings)
        self._control: ControlPlane | None = None
        handlers.register(self.service, self.control)
        self.service.health_checks.append(self._health)

    def control(self) -> ControlPlane:
        """The control plane (only between start-up and shutdown)."""
        if self._control is None:
            raise RuntimeError("router not started")
        return self._control

    async def _health(self) -> dict[str, str]:
        if self._control is None:
            return {"state": "starting"}
        return await self._control.health()

    @asynccontextmanager
    async def lifespan(self, service: Service) -> AsyncIterator[None]:
        """Open Postgres (migrated), S3 (bucket ensured), streams, then listen to capacity reports."""
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
            control = ControlPlane(
                PostgresReleaseStore(pool),
                blobs,
                NatsAgentClient(service.nc),
                NatsPlatform(service.js),
                start_timeout_s=s.start_timeout_s,
            )
            await control.load()
            listener = handlers.CapacityListener(control)
            sub = await service.nc.subscribe(subjects.CAPACITY_ALL, cb=listener.on_message)
            self._control = control
            log.info("router ready (schema %s, bucket %s)", s.schema, s.s3_bucket)
            try:
                yield
            finally:
                self._control = None
                await sub.unsubscribe()
        finally:
            await pool.close()

    async def run(self) -> None:
        """Run until SIGTERM/SIGINT."""
        await self.service.run(self.lifespan)


def build_app(settings: Settings) -> RouterApp:
    """The router service for ``settings``, ready to :meth:`RouterApp.run`."""
    return RouterApp(settings)

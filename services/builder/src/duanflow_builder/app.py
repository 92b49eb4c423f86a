"""Wiring of the builder service: settings → adapters → domain → handlers, in one lifespan."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager

from duanflow_kit.service import Service
from duanflow_kit.streams import ensure_streams

from duanflow_builder import handlers
from duanflow_builder.adapters.docker_engine import DockerImageBuilder
from duanflow_builder.adapters.nats import NatsBuildEvents, SystemClock
from duanflow_builder.adapters.postgres import PgImageStore
from duanflow_builder.adapters.s3 import S3Artifacts
from duanflow_builder.adapters.uv import UvVenvBuilder
from duanflow_builder.domain import Builder
from duanflow_builder.settings import Settings

Lifespan = Callable[[Service], AbstractAsyncContextManager[None]]


class BuilderApp:
    """The builder process: its :class:`Service` and the lifespan that opens its resources."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.service = Service("builder", settings)
        self.builder: Builder | None = None
        self._store: PgImageStore | None = None
        handlers.register(self.service, lambda: self.builder, max_workers=settings.max_concurrent_builds)
        self.service.health_checks.append(self._health)

    async def _health(self) -> dict[str, str]:
        if self.builder is None:
            return {"db": "starting"}
        return {"db": "ok", "images": str(await self.builder.images_built())}

    @asynccontextmanager
    async def lifespan(self, svc: Service) -> AsyncIterator[None]:
        """Migrate the schema, open S3, ensure the streams, build the domain; close on the way out."""
        s = self.settings
        await ensure_streams(svc.js)
        store = await PgImageStore.open(s.database_url, s.schema)
        try:
            artifacts = S3Artifacts(s.s3_endpoint, s.s3_access_key, s.s3_secret_key, s.s3_bucket, secure=s.s3_secure)
            await artifacts.ensure_bucket()
            docker = docker_backend(s)
            self.builder = Builder(
                store,
                artifacts,
                UvVenvBuilder(work_dir=s.work_dir, timeout_s=s.build_timeout_s),
                NatsBuildEvents(svc.nc),
                SystemClock(),
                stale_after_s=s.stale_build_s,
                docker=docker,
            )
            yield
        finally:
            self.builder = None
            await store.close()

    async def run(self) -> None:
        """Run until SIGTERM."""
        await self.service.run(self.lifespan)


def docker_backend(s: Settings) -> DockerImageBuilder | None:
    """The docker backend when ``docker_host`` is set (it then needs ``docker_registry``)."""
    if not s.docker_host:
        return None
    if not s.docker_registry:
        raise SystemExit("DUANFLOW_BUILDER_DOCKER_REGISTRY must name the registry (host:port) docker images go to")
    return DockerImageBuilder(
        base_url=s.docker_host,
        registry=s.docker_registry,
        base_image=s.docker_base_image,
        uv_image=s.docker_uv_image,
        timeout_s=s.build_timeout_s,
    )


def build_app(settings: Settings) -> BuilderApp:
    """The builder process for ``settings``."""
    return BuilderApp(settings)

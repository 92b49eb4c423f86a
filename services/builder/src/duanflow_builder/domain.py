"""The builder's rules, pure: image ids, what a backend can build, and the build use case.

No transport or database imports here: the use case talks to :mod:`duanflow_builder.ports` only.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import msgspec
from duanflow_proto import subjects
from duanflow_proto.errors import InvalidInputError, UnavailableError
from duanflow_proto.messages.build import BuildRequest, BuildResult, ImageSpec, image_artifact_key, needs_docker
from duanflow_proto.messages.logs import LogLine

from duanflow_builder.ports import (
    ArtifactStore,
    BuildEvents,
    BuildFailedError,
    Clock,
    DockerBuilder,
    ImageStore,
    VenvBuilder,
)

log = logging.getLogger("duanflow.builder")

BACKENDS = ("venv", "docker")
LOG_TAIL_LINES = 30
DEFAULT_LOG_APP = "builder"
"""App name of the build logs of a request that names no app."""


def canonical_spec(spec: ImageSpec) -> bytes:
    """The canonical bytes of a spec: msgspec JSON, dict keys (``env``) sorted, lists (``pip``) in order.

    >>> canonical_spec(ImageSpec(env={"b": "1", "a": "2"})) == canonical_spec(ImageSpec(env={"a": "2", "b": "1"}))
    True
    """
    return msgspec.json.encode(spec, order="deterministic")


def image_id(spec: ImageSpec) -> str:
    """Content-addressed image id: ``im-`` + the first 24 hex digits of sha256 of :func:`canonical_spec`.

    >>> image_id(ImageSpec()).startswith("im-") and len(image_id(ImageSpec())) == 27
    True
    """
    return "im-" + hashlib.sha256(canonical_spec(spec)).hexdigest()[:24]


def artifact_key(image: str) -> str:
    """S3 key of a packed venv image (the router presigns the same key for agents)."""
    return image_artifact_key(image)


def needs_build(spec: ImageSpec) -> bool:
    """False when the agent's own environment is the image (nothing to install)."""
    return bool(spec.pip or spec.apt or spec.commands)


def choose_backend(req: BuildRequest, *, docker: bool) -> str:
    """The backend that builds ``req``: docker when asked, or when the spec needs it and the stack has one.

    >>> choose_backend(BuildRequest(spec=ImageSpec(apt=["git"])), docker=True)
    'docker'
    >>> choose_backend(BuildRequest(spec=ImageSpec(apt=["git"])), docker=False)
    'venv'
    """
    if req.backend == "venv" and docker and needs_docker(req.spec):
        return "docker"
    return req.backend


def validate(req: BuildRequest, backend: str = "", *, docker: bool = False) -> None:
    """Refuse what ``backend`` (default: the requested one) cannot build, naming what to do instead.

    ``docker``: this builder has a docker backend configured.
    """
    for what, value in (("env", req.env), ("app", req.app or DEFAULT_LOG_APP)):
        try:
            subjects.token(value)
        except ValueError as exc:
            raise InvalidInputError(f"invalid {what} name: {exc}", details={"field": what}) from None
    if req.backend not in BACKENDS:
        raise InvalidInputError(
            f"unknown build backend {req.backend!r}: use one of {', '.join(BACKENDS)}",
            details={"field": "backend", "valid": ",".join(BACKENDS)},
        )
    spec = req.spec
    backend = backend or req.backend
    if backend == "venv" and (spec.apt or spec.commands):
        used = " and ".join(n for n, v in (("apt_install", spec.apt), ("run_commands", spec.commands)) if v)
        raise InvalidInputError(
            f"this image uses {used}, which needs the docker runtime: the venv backend (process runtime) "
            "installs Python packages only. Deploy to a stack with the docker runtime, or remove "
            f"{used} from the image.",
            details={"backend": "venv", "needs": "docker"},
        )
    if backend == "docker" and not docker:
        raise InvalidInputError(
            "this stack's builder has no docker backend: start it with DUANFLOW_BUILDER_DOCKER_HOST and "
            "DUANFLOW_BUILDER_DOCKER_REGISTRY set, or use the venv backend",
            details={"backend": "docker"},
        )
    for pkg in spec.pip:
        if not pkg.strip() or pkg.lstrip().startswith("-") or any(c in pkg for c in "\r\n\0"):
            raise InvalidInputError(
                f"invalid pip requirement {pkg!r}: give one requirement per entry, without pip options",
                details={"field": "pip"},
            )


class Builder:
    """The build use case: cache lookup, one build per image id at a time, logs, record, announce."""

    def __init__(
        self,
        store: ImageStore,
        artifacts: ArtifactStore,
        venv: VenvBuilder,
        events: BuildEvents,
        clock: Clock,
        *,
        stale_after_s: float = 3600.0,
        docker: DockerBuilder | None = None,
    ) -> None:
        self._store = store
        self._artifacts = artifacts
        self._venv = venv
        self._events = events
        self._clock = clock
        self._stale_after_s = stale_after_s
        self._docker = docker
        self._locks: dict[str, asyncio.Lock] = {}
        self._waiters: dict[str, int] = {}

    @asynccontextmanager
    async def _lock(self, key: str) -> AsyncIterator[None]:
        lock = self._locks.setdefault(key, asyncio.Lock())
        self._waiters[key] = self._waiters.get(key, 0) + 1
        try:
            async with lock:
                yield
        finally:
            self._waiters[key] -= 1
            if not self._waiters[key]:
                del self._waiters[key]
                del self._locks[key]

    async def build(self, req: BuildRequest) -> BuildResult:
        """Answer a build request: ``cached``, ``built`` or ``failed`` (invalid requests raise)."""
        backend = choose_backend(req, docker=self._docker is not None)
        validate(req, backend, docker=self._docker is not None)
        spec = req.spec
        image = image_id(spec)
        async with self._lock(f"{image}/{backend}"):
            row = await self._store.get(image, backend)
            if row is not None and row.status == "built":
                if not row.artifact or await self._stored(backend, row.artifact):
                    return BuildResult(image_id=image, status="cached", backend=row.backend, artifact=row.artifact)
                # The record outlived its artifact (the bucket or registry was emptied): build it again.
                log.warning("image %s is recorded as built but %s is gone: rebuilding", image, row.artifact)
                await self._store.forget(image, backend)
            if not await self._store.claim(image, backend, canonical_spec(spec), self._stale_after_s):
                row = await self._store.get(image, backend)
                if row is not None and row.status == "built":
                    return BuildResult(image_id=image, status="cached", backend=row.backend, artifact=row.artifact)
                raise UnavailableError(
                    f"image {image} is being built by another builder instance: retry shortly",
                    details={"image_id": image},
                )
            return await self._run(msgspec.structs.replace(req, backend=backend), image)

    async def _stored(self, backend: str, artifact: str) -> bool:
        if backend == "docker":
            assert self._docker is not None
            try:
                return await self._docker.exists(artifact)
            except BuildFailedError as exc:
                raise UnavailableError(f"cannot check image {artifact}: {exc}") from None
        return await self._artifacts.exists(artifact)

    async def _run(self, req: BuildRequest, image: str) -> BuildResult:
        started = self._clock.monotonic()
        tail: deque[str] = deque(maxlen=LOG_TAIL_LINES)
        app = req.app or DEFAULT_LOG_APP

        async def emit(text: str, level: str = "info") -> None:
            tail.append(text)
            now = self._clock.now_ms()
            line = LogLine(ts_ms=now, env=req.env, app=app, kind="build", source=image, message=text, level=level)
            await self._events.line(line)

        def elapsed_ms() -> int:
            return int((self._clock.monotonic() - started) * 1000)

        artifact = ""
        try:
            if req.backend == "docker":
                assert self._docker is not None
                artifact = await self._docker.build(req.spec, image, emit)
            elif needs_build(req.spec):
                await emit(f"building image {image} ({len(req.spec.pip)} python packages)")
                path = await self._venv.build(req.spec, emit)
                try:
                    artifact = artifact_key(image)
                    await emit(f"uploading {artifact}")
                    await self._artifacts.upload(artifact, path)
                finally:
                    self._venv.discard(path)
            else:
                await emit(f"image {image} needs no build: replicas run in the agent's own environment")
        except BuildFailedError as exc:
            await emit(f"build failed: {exc}", "error")
            log_tail = "\n".join(tail)
            await self._store.finish(
                image, req.backend, status="failed", artifact="", duration_ms=elapsed_ms(), log_tail=log_tail
            )
            return BuildResult(
                image_id=image, status="failed", backend=req.backend, log_tail=log_tail, duration_ms=elapsed_ms()
            )
        except BaseException:
            await asyncio.shield(
                self._store.finish(
                    image, req.backend, status="failed", artifact="", duration_ms=elapsed_ms(), log_tail="\n".join(tail)
                )
            )
            raise
        duration = elapsed_ms()
        await emit(f"built {image} in {duration} ms")
        await self._store.finish(
            image, req.backend, status="built", artifact=artifact, duration_ms=duration, log_tail=""
        )
        result = BuildResult(
            image_id=image, status="built", backend=req.backend, artifact=artifact, duration_ms=duration
        )
        await self._events.done(result)
        return result

    async def images_built(self) -> int:
        """How many images are built (for health)."""
        return await self._store.count()

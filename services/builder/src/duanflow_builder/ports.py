"""What the builder's domain needs from the outside world, as Protocols (adapters implement them)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from duanflow_proto.messages.build import BuildResult, ImageSpec
from duanflow_proto.messages.logs import LogLine

Emit = Callable[[str], Awaitable[None]]
"""Receives each build-log line as it is produced."""


class BuildFailedError(Exception):
    """A build step failed (the build log says why); raised by :class:`VenvBuilder` adapters."""


@dataclass(frozen=True)
class ImageRecord:
    """A row of the image table."""

    image_id: str
    backend: str
    status: str
    artifact: str
    duration_ms: int


class ImageStore(Protocol):
    """Durable record of images (Postgres schema ``builder``)."""

    async def get(self, image_id: str, backend: str) -> ImageRecord | None:
        """The row of one image, or None."""
        ...

    async def claim(self, image_id: str, backend: str, spec_json: bytes, stale_after_s: float) -> bool:
        """Mark the image ``building``; False when it is built or another instance is building it now."""
        ...

    async def finish(
        self, image_id: str, backend: str, *, status: str, artifact: str, duration_ms: int, log_tail: str
    ) -> None:
        """Record the outcome of a build (``built`` or ``failed``)."""
        ...

    async def forget(self, image_id: str, backend: str) -> None:
        """Mark a built image as needing a new build (its artifact is gone)."""
        ...

    async def count(self) -> int:
        """How many images are built."""
        ...


class ArtifactStore(Protocol):
    """Where built images are kept (S3)."""

    async def upload(self, key: str, path: Path) -> None:
        """Store the file at ``path`` under ``key``."""
        ...

    async def exists(self, key: str) -> bool:
        """Whether ``key`` is stored."""
        ...


class VenvBuilder(Protocol):
    """Builds a virtualenv for a spec and packs it as one ``.tar.gz`` file."""

    async def build(self, spec: ImageSpec, emit: Emit) -> Path:
        """Build ``spec``, streaming log lines to ``emit``; the packed image's path.

        Raises :class:`BuildFailedError` when a step fails.
        """
        ...

    def discard(self, path: Path) -> None:
        """Remove what :meth:`build` left on disk."""
        ...


class DockerBuilder(Protocol):
    """Builds a spec as a container image and pushes it to the stack's registry."""

    async def build(self, spec: ImageSpec, image_id: str, emit: Emit) -> str:
        """Build and push ``spec`` as image ``image_id``, streaming log lines to ``emit``; its registry reference.

        Raises :class:`BuildFailedError` when a step fails.
        """
        ...

    async def exists(self, ref: str) -> bool:
        """Whether the registry still holds ``ref``."""
        ...


class BuildEvents(Protocol):
    """Publishes build-log lines and build-done events."""

    async def line(self, line: LogLine) -> None:
        """Publish one log line (never raises)."""
        ...

    async def done(self, result: BuildResult) -> None:
        """Announce that an image is built (never raises)."""
        ...


class Clock(Protocol):
    """Wall and monotonic time."""

    def now_ms(self) -> int:
        """Epoch milliseconds."""
        ...

    def monotonic(self) -> float:
        """Seconds from an arbitrary origin."""
        ...

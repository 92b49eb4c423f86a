"""What the agent's supervisor needs from the outside world, as Protocols (adapters implement them)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Protocol

from duanflow_agent.domain import Inventory


class GpuProbe(Protocol):
    """Reads the host's GPUs (NVML)."""

    def read(self) -> Inventory | None:
        """The GPUs now, or None when there is no NVIDIA driver."""
        ...


class BundleStore(Protocol):
    """Fetches source bundles, verified and extracted, cached by digest."""

    async def fetch(self, url: str, digest: str) -> Path:
        """The extracted bundle directory of ``digest``, downloading ``url`` if not cached."""
        ...


class ImageFetcher(Protocol):
    """Fetches venv images, unpacked and cached by id (least recently used out past a disk cap)."""

    async def fetch(self, url: str, image_id: str) -> list[str]:
        """The image's import paths (site-packages), downloading ``url`` if not cached."""
        ...

    def cached(self) -> list[str]:
        """Ids of the images on disk."""
        ...


LineSink = Callable[[str, str], None]
"""Receives ``(stream, line)`` for each output line of a replica (``stdout`` / ``stderr``); must not block."""


class ReplicaLog(Protocol):
    """The on-disk log of one replica."""

    path: Path
    """Where it is."""

    def write(self, stream: str, line: str) -> None:
        """Append one line; must not block for long nor raise."""
        ...

    def close(self) -> None:
        """Flush and close."""
        ...


LogOpener = Callable[[Path], ReplicaLog]
"""Opens the log file of one replica at a path."""


class ReplicaProcess(Protocol):
    """One running replica process."""

    @property
    def pid(self) -> int:
        """Its process id."""
        ...

    async def wait(self) -> int:
        """Wait until it exits (its output fully read); its exit status."""
        ...

    async def stop(self, grace_s: float) -> int:
        """SIGTERM, then SIGKILL after ``grace_s``; its exit status."""
        ...


class Spawner(Protocol):
    """Starts replica processes."""

    async def spawn(self, argv: list[str], *, cwd: Path, env: Mapping[str, str], on_line: LineSink) -> ReplicaProcess:
        """Start ``argv``; every output line goes to ``on_line``."""
        ...


class ContainerSpawner(Protocol):
    """Starts replicas as containers (the docker runtime)."""

    async def spawn(
        self,
        image: str,
        argv: list[str],
        *,
        name: str,
        cwd: Path,
        env: Mapping[str, str],
        binds: Sequence[Path],
        gpu_indices: Sequence[int],
        on_line: LineSink,
    ) -> ReplicaProcess:
        """Start ``argv`` in a container of ``image`` named after ``name``, with exactly ``env``, the host paths
        ``binds`` mounted read-only at the same paths and the host GPUs ``gpu_indices``; every output line goes to
        ``on_line``."""
        ...


class ReadySignal(Protocol):
    """Readiness announcements of replicas."""

    def listen(self, replica_id: str) -> AbstractAsyncContextManager[Awaitable[None]]:
        """Subscribe now; the yielded awaitable completes when ``replica_id`` announces readiness."""
        ...

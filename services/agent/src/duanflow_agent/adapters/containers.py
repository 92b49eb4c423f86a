"""Docker runtime: replicas as containers of the Docker engine, through the docker SDK.

Each replica is one container on the host network (it reaches NATS as a process would), with the agent's
bundle directory mounted read-only at the same path, its GPUs through a device request, and ``docker-init`` as
PID 1 so SIGTERM reaches the runtime. Its output is read from the engine's attach stream and relayed line by
line; the container is removed once it has exited.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from docker.api.client import APIClient
from docker.errors import APIError, DockerException, ImageNotFound, NotFound
from docker.types import DeviceRequest
from duanflow_proto.errors import InvalidInputError, UnavailableError

from duanflow_agent.domain import AGENT_STREAM
from duanflow_agent.ports import LineSink

log = logging.getLogger("duanflow.agent.docker")

DRAIN_AFTER_EXIT_S = 2.0
LINE_LIMIT = 1024 * 1024
POOL_SIZE = 64
"""Engine connections kept per client (each live replica holds one for its output stream)."""
LABEL_AGENT = "io.duanflow.agent"
LABEL_REPLICA = "io.duanflow.replica"

Frames = Iterator[tuple[bytes | None, bytes | None]]
"""The engine's demultiplexed attach stream: ``(stdout, stderr)`` chunks."""


class _Lines:
    """Splits one output stream's chunks into lines (a line over ``LINE_LIMIT`` is dropped with a note)."""

    def __init__(self, name: str, on_line: LineSink) -> None:
        self.name = name
        self.on_line = on_line
        self.buf = b""

    def feed(self, chunk: bytes) -> None:
        self.buf += chunk
        *lines, self.buf = self.buf.split(b"\n")
        for raw in lines:
            self.on_line(self.name, raw.decode("utf-8", "replace").rstrip("\r"))
        if len(self.buf) > LINE_LIMIT:
            self.buf = b""
            self.on_line(self.name, f"[duanflow: a line of over {LINE_LIMIT} bytes was dropped]")

    def close(self) -> None:
        if self.buf:
            self.on_line(self.name, self.buf.decode("utf-8", "replace").rstrip("\r"))
            self.buf = b""


def _pump(frames: Frames, on_line: LineSink) -> None:
    """Relay a demultiplexed attach stream until the container's output ends."""
    out, err = _Lines("stdout", on_line), _Lines("stderr", on_line)
    try:
        for stdout, stderr in frames:
            if stdout:
                out.feed(stdout)
            if stderr:
                err.feed(stderr)
    except (DockerException, OSError) as exc:
        on_line(AGENT_STREAM, f"[duanflow: output stream of the container broke: {exc}]")
    finally:
        out.close()
        err.close()


class ContainerReplica:
    """One replica container (:class:`duanflow_agent.ports.ReplicaProcess`)."""

    def __init__(
        self,
        api: APIClient,
        container_id: str,
        pid: int,
        frames: Frames,
        on_line: LineSink,
    ) -> None:
        self._api = api
        self.container_id = container_id
        self._pid = pid
        self._reader = asyncio.ensure_future(asyncio.to_thread(_pump, frames, on_line))
        self._exit: asyncio.Future[int] | None = None

    @property
    def pid(self) -> int:
        """Host pid of the container's init process."""
        return self._pid

    async def wait(self) -> int:
        """Wait for the container to exit and its output to be read; then it is removed. Its exit status."""
        if self._exit is None:
            self._exit = asyncio.ensure_future(self._wait_once())
        return await asyncio.shield(self._exit)

    async def _wait_once(self) -> int:
        try:
            status: dict[str, Any] = await asyncio.to_thread(self._api.wait, self.container_id, None)
            code = int(status.get("StatusCode", -1))
        except NotFound:
            code = -1
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self._reader), DRAIN_AFTER_EXIT_S)
        with contextlib.suppress(DockerException):
            await asyncio.to_thread(self._api.remove_container, self.container_id, force=True)
        return code

    async def stop(self, grace_s: float) -> int:
        """SIGTERM the container (its runtime drains), SIGKILL it after ``grace_s``; removed once exited."""
        await self._signal("SIGTERM")
        waiting = asyncio.ensure_future(self.wait())
        done, _ = await asyncio.wait({waiting}, timeout=max(grace_s, 0.0))
        if not done:
            await self._signal("SIGKILL")
        return await waiting

    async def _signal(self, sig: str) -> None:
        try:
            await asyncio.to_thread(self._api.kill, self.container_id, sig)
        except (NotFound, APIError) as exc:  # already gone or not running any more
            log.debug("signal %s to %s: %s", sig, self.container_id[:12], exc)


class DockerSpawner:
    """Starts replica containers on the Docker engine at ``base_url`` (``ContainerSpawner``)."""

    def __init__(self, base_url: str, *, agent_id: str, timeout_s: float = 300.0) -> None:
        self.agent_id = agent_id
        self._api = APIClient(base_url=base_url, timeout=int(timeout_s), max_pool_size=POOL_SIZE)
        # Output streams and exit waits last as long as their replica: a client whose reads never time out (the
        # SDK leaves a read timeout on attach streams, which would cut a replica that is silent for a while).
        self._streams = APIClient(base_url=base_url, timeout=None, max_pool_size=POOL_SIZE)
        self._pulls: dict[str, asyncio.Lock] = {}

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
    ) -> ContainerReplica:
        """Start ``argv`` in a container of ``image`` (pulled when missing) with exactly ``env``."""
        try:
            await self._ensure_image(image)
            cid, pid, frames = await asyncio.to_thread(self._run, image, argv, name, cwd, env, binds, gpu_indices)
            return ContainerReplica(self._streams, cid, pid, frames, on_line)
        except NotFound:  # the registry has no such image (or tag)
            raise InvalidInputError(f"docker image {image} is not in the registry: build it again") from None
        except DockerException as exc:
            raise UnavailableError(f"the docker engine could not start {image}: {exc}") from None

    async def _ensure_image(self, image: str) -> None:
        lock = self._pulls.setdefault(image, asyncio.Lock())
        async with lock:
            try:
                await asyncio.to_thread(self._api.inspect_image, image)
                return
            except ImageNotFound:
                pass
            repo, _, tag = image.rpartition(":")
            if "/" in tag or not repo:
                repo, tag = image, "latest"
            log.info("pulling %s", image)
            await asyncio.to_thread(self._api.pull, repo, tag)
            await asyncio.to_thread(self._api.inspect_image, image)

    def _run(
        self,
        image: str,
        argv: list[str],
        name: str,
        cwd: Path,
        env: Mapping[str, str],
        binds: Sequence[Path],
        gpu_indices: Sequence[int],
    ) -> tuple[str, int, Frames]:
        devices = (
            [DeviceRequest(device_ids=[str(i) for i in gpu_indices], capabilities=[["gpu"]])] if gpu_indices else None
        )
        host_config = self._api.create_host_config(
            network_mode="host",
            binds={str(p): {"bind": str(p), "mode": "ro"} for p in binds},
            device_requests=devices,
            init=True,
        )
        created = self._api.create_container(
            image,
            command=argv,
            environment=dict(env),
            working_dir=str(cwd),
            host_config=host_config,
            labels={LABEL_AGENT: self.agent_id, LABEL_REPLICA: name},
            name=f"duanflow-{name}",
            detach=True,
        )
        cid = str(created["Id"])
        try:
            self._api.start(cid)
            # Attached after the start with logs=True: the output so far is replayed, nothing is lost.
            frames = self._streams.attach(cid, stdout=True, stderr=True, stream=True, logs=True, demux=True)
            pid = int(self._api.inspect_container(cid)["State"].get("Pid") or 0)
            return cid, pid, frames
        except BaseException:
            with contextlib.suppress(DockerException):
                self._api.remove_container(cid, force=True)
            raise

    def remove_leftovers(self) -> int:
        """Remove containers a previous run of this agent left behind (it died without stopping them)."""
        removed = 0
        for c in self._api.containers(all=True, filters={"label": f"{LABEL_AGENT}={self.agent_id}"}):
            with contextlib.suppress(DockerException):
                self._api.remove_container(c["Id"], force=True)
                removed += 1
        return removed

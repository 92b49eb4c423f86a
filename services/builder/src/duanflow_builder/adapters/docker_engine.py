"""Docker backend: render the spec's Dockerfile, build it with the Docker engine, push it to the stack's registry.

The engine's build and push output arrives as JSON messages on a blocking HTTP stream; a thread reads it and
hands each log line to the event loop, so the build log streams while the build runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from docker.api.client import APIClient
from docker.errors import DockerException
from duanflow_proto.messages.build import ImageSpec, docker_image_ref

from duanflow_builder.dockerfile import UV_IMAGE, render
from duanflow_builder.ports import BuildFailedError, Emit

MANIFEST_TYPES = ", ".join(
    (
        "application/vnd.docker.distribution.manifest.v2+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.oci.image.index.v1+json",
    )
)
image_ref = docker_image_ref
"""The registry reference of an image (``<registry>/duanflow/images:<image id>``)."""


def _build_lines(messages: Iterable[dict[str, Any]]) -> Iterator[str]:
    """Log lines of the engine's build messages; a build error raises :class:`BuildFailedError`."""
    for msg in messages:
        if "error" in msg:
            detail = msg.get("errorDetail") or {}
            raise BuildFailedError(str(detail.get("message") or msg["error"]).strip())
        text = msg.get("stream") or msg.get("status") or ""
        for line in str(text).splitlines():
            if line.strip():
                yield line.rstrip()


def _push_lines(messages: Iterable[dict[str, Any]]) -> Iterator[str]:
    """Log lines of the engine's push messages (per-layer progress folded away); an error raises."""
    for msg in messages:
        if "error" in msg:
            raise BuildFailedError(f"push failed: {msg['error']}")
        if "progressDetail" in msg and msg.get("progress"):
            continue
        status = str(msg.get("status") or "").strip()
        if status:
            yield f"{msg['id']}: {status}" if msg.get("id") else status


class DockerImageBuilder:
    """:class:`duanflow_builder.ports.DockerBuilder` over the Docker engine at ``base_url``."""

    def __init__(
        self,
        *,
        base_url: str,
        registry: str,
        base_image: str = "",
        uv_image: str = UV_IMAGE,
        timeout_s: float = 900.0,
    ) -> None:
        self.registry = registry
        self.base_image = base_image
        self.uv_image = uv_image
        self.timeout_s = timeout_s
        self._api = APIClient(base_url=base_url, timeout=int(timeout_s))

    async def build(self, spec: ImageSpec, image_id: str, emit: Emit) -> str:
        """Build ``spec`` tagged as its registry reference and push it; that reference."""
        ref = image_ref(self.registry, image_id)
        dockerfile = render(spec, base=self.base_image, uv_image=self.uv_image)
        await emit(f"building {ref} with docker ({len(dockerfile.splitlines())} Dockerfile lines)")
        try:
            async with asyncio.timeout(self.timeout_s):
                await _relay(lambda: _build_lines(self._build_stream(dockerfile, ref, image_id)), emit)
                await emit(f"pushing {ref}")
                await _relay(lambda: _push_lines(self._api.push(ref, stream=True, decode=True)), emit)
        except TimeoutError:
            raise BuildFailedError(f"the build ran past its {self.timeout_s:.0f}s limit") from None
        except DockerException as exc:
            raise BuildFailedError(f"docker engine: {exc}") from None
        return ref

    def _build_stream(self, dockerfile: str, ref: str, image_id: str) -> Iterator[dict[str, Any]]:
        stream: Iterator[dict[str, Any]] = self._api.build(
            fileobj=io.BytesIO(dockerfile.encode()),
            tag=ref,
            rm=True,
            forcerm=True,
            decode=True,
            labels={"io.duanflow.image_id": image_id},
            network_mode="host",  # RUN steps (apt-get) reach the network the way the host does
        )
        return stream

    async def exists(self, ref: str) -> bool:
        """Whether the registry holds ``ref`` (a manifest ``HEAD``)."""
        return await asyncio.to_thread(self._exists, ref)

    def _exists(self, ref: str) -> bool:
        host, _, rest = ref.partition("/")
        repo, _, tag = rest.rpartition(":")
        req = urllib.request.Request(
            f"http://{host}/v2/{repo}/manifests/{tag}", method="HEAD", headers={"Accept": MANIFEST_TYPES}
        )
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:  # noqa: S310
                return bool(resp.status == 200)
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                return False
            raise BuildFailedError(f"registry {host} answered HTTP {exc.code} for {ref}") from None
        except (urllib.error.URLError, OSError) as exc:
            raise BuildFailedError(f"registry {host} unreachable: {exc}") from None

    def close(self) -> None:
        """Close the engine connection."""
        with contextlib.suppress(Exception):
            self._api.close()


_DONE = object()


async def _relay(lines: Callable[[], Iterator[str]], emit: Emit) -> None:
    """Iterate ``lines()`` in a thread, awaiting ``emit`` for each line here; its exception is raised here."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[object] = asyncio.Queue()

    def pump() -> None:
        try:
            for line in lines():
                loop.call_soon_threadsafe(queue.put_nowait, line)
        except BaseException as exc:  # handed to the event loop, raised there
            loop.call_soon_threadsafe(queue.put_nowait, exc)
        finally:
            loop.call_soon_threadsafe(queue.put_nowait, _DONE)

    worker = asyncio.ensure_future(asyncio.to_thread(pump))
    failure: BaseException | None = None
    try:
        while (item := await queue.get()) is not _DONE:
            if isinstance(item, BaseException):
                failure = item
            else:
                await emit(str(item))
    finally:
        if not worker.done():
            # Cancelled (timeout): the thread ends when the engine closes the stream; do not wait for it here.
            worker.add_done_callback(lambda _: None)
        else:
            await worker
    if failure is not None:
        raise failure

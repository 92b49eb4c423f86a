"""The builder's docker backend choice and use case over fake ports (the real engine: test_docker_runtime.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from duanflow_builder.adapters.docker_engine import _build_lines, _push_lines, image_ref
from duanflow_builder.dockerfile import render
from duanflow_builder.domain import Builder, choose_backend, image_id
from duanflow_builder.ports import BuildFailedError, Emit, ImageRecord
from duanflow_proto.errors import InvalidInputError
from duanflow_proto.messages.build import BuildRequest, BuildResult, ImageSpec
from duanflow_proto.messages.logs import LogLine

pytestmark = pytest.mark.timeout(10)


class Store:
    def __init__(self) -> None:
        self.rows: dict[tuple[str, str], ImageRecord] = {}

    async def get(self, image_id: str, backend: str) -> ImageRecord | None:
        return self.rows.get((image_id, backend))

    async def claim(self, image_id: str, backend: str, spec_json: bytes, stale_after_s: float) -> bool:
        row = self.rows.get((image_id, backend))
        if row is not None and row.status in ("built", "building"):
            return False
        self.rows[(image_id, backend)] = ImageRecord(image_id, backend, "building", "", 0)
        return True

    async def finish(
        self, image_id: str, backend: str, *, status: str, artifact: str, duration_ms: int, log_tail: str
    ) -> None:
        self.rows[(image_id, backend)] = ImageRecord(image_id, backend, status, artifact, duration_ms)

    async def forget(self, image_id: str, backend: str) -> None:
        row = self.rows[(image_id, backend)]
        self.rows[(image_id, backend)] = ImageRecord(image_id, backend, "failed", row.artifact, row.duration_ms)

    async def count(self) -> int:
        return sum(r.status == "built" for r in self.rows.values())


class Artifacts:
    async def upload(self, key: str, path: Path) -> None:
        raise AssertionError("the docker backend uploads nothing to S3")

    async def exists(self, key: str) -> bool:
        raise AssertionError("docker images are checked in the registry")


class Venv:
    async def build(self, spec: ImageSpec, emit: Emit) -> Path:
        raise AssertionError("a spec that needs docker never reaches the venv backend")

    def discard(self, path: Path) -> None:
        pass


class Docker:
    def __init__(self, fail: str = "") -> None:
        self.fail = fail
        self.builds: list[str] = []
        self.pushed: set[str] = set()

    async def build(self, spec: ImageSpec, image_id: str, emit: Emit) -> str:
        self.builds.append(image_id)
        await emit("Step 1/3 : FROM base")
        if self.fail:
            raise BuildFailedError(self.fail)
        ref = image_ref("reg:5000", image_id)
        self.pushed.add(ref)
        return ref

    async def exists(self, ref: str) -> bool:
        return ref in self.pushed


class Events:
    def __init__(self) -> None:
        self.lines: list[LogLine] = []
        self.built: list[BuildResult] = []

    async def line(self, line: LogLine) -> None:
        self.lines.append(line)

    async def done(self, result: BuildResult) -> None:
        self.built.append(result)


class Clock:
    def now_ms(self) -> int:
        return 1_700_000_000_000

    def monotonic(self) -> float:
        return 0.0


def make(docker: Docker | None) -> tuple[Builder, Store, Events]:
    store, events = Store(), Events()
    return Builder(store, Artifacts(), Venv(), events, Clock(), docker=docker), store, events


@pytest.mark.parametrize(
    ("spec", "backend", "docker", "chosen"),
    [
        (ImageSpec(apt=["git"]), "venv", True, "docker"),
        (ImageSpec(commands=["make"]), "venv", True, "docker"),
        (ImageSpec(base="cuda", cuda="12.4"), "venv", True, "docker"),
        (ImageSpec(pip=["numpy"]), "venv", True, "venv"),
        (ImageSpec(pip=["numpy"]), "docker", True, "docker"),
        (ImageSpec(apt=["git"]), "venv", False, "venv"),
    ],
)
def test_backend_follows_what_the_spec_needs(spec: ImageSpec, backend: str, docker: bool, chosen: str) -> None:
    assert choose_backend(BuildRequest(spec=spec, backend=backend), docker=docker) == chosen


async def test_apt_spec_builds_with_docker_once_then_is_cached() -> None:
    docker = Docker()
    builder, store, events = make(docker)
    req = BuildRequest(spec=ImageSpec(apt=["ffmpeg"]), app="hello", env="prod")
    first = await builder.build(req)
    image = image_id(req.spec)
    assert (first.status, first.backend, first.artifact) == ("built", "docker", f"reg:5000/duanflow/images:{image}")
    assert [(line.kind, line.source) for line in events.lines][:2] == [("build", image)] * 2
    again = await builder.build(req)
    assert (again.status, again.artifact) == ("cached", first.artifact)
    assert docker.builds == [image]
    docker.pushed.clear()  # the registry lost it: built again
    assert (await builder.build(req)).status == "built"
    assert docker.builds == [image, image]
    assert store.rows[(image, "docker")].status == "built"


async def test_failed_docker_build_records_no_image() -> None:
    builder, store, events = make(Docker(fail="The command '/bin/sh -c exit 3' returned a non-zero code: 3"))
    result = await builder.build(BuildRequest(spec=ImageSpec(commands=["exit 3"])))
    assert (result.status, result.artifact) == ("failed", "")
    assert result.log_tail.endswith("returned a non-zero code: 3")
    assert events.built == [] and store.rows[(result.image_id, "docker")].status == "failed"


async def test_docker_requested_without_a_docker_backend_is_refused() -> None:
    builder, _, _ = make(None)
    with pytest.raises(InvalidInputError, match="DUANFLOW_BUILDER_DOCKER_HOST"):
        await builder.build(BuildRequest(spec=ImageSpec(), backend="docker"))
    with pytest.raises(InvalidInputError, match="docker runtime"):
        await builder.build(BuildRequest(spec=ImageSpec(apt=["git"])))


def test_engine_messages_become_log_lines_and_errors() -> None:
    assert list(_build_lines([{"stream": "Step 1/2 : FROM x\n"}, {"stream": "\n"}, {"aux": {"ID": "sha"}}])) == [
        "Step 1/2 : FROM x"
    ]
    with pytest.raises(BuildFailedError, match="non-zero code: 3"):
        list(_build_lines([{"error": "x", "errorDetail": {"message": "returned a non-zero code: 3"}}]))
    pushed: list[dict[str, Any]] = [
        {"status": "Preparing", "id": "abc"},
        {"status": "Pushing", "progressDetail": {}, "progress": "[=>]"},
    ]
    assert list(_push_lines(pushed)) == ["abc: Preparing"]
    with pytest.raises(BuildFailedError, match="push failed"):
        list(_push_lines([{"error": "denied"}]))


def test_a_spec_without_pip_needs_no_uv_image() -> None:
    text = render(ImageSpec(commands=["echo hi > /marker"]), base="local/base:1")
    assert "uv" not in text.replace("UV_", "") and "FROM local/base:1" in text
    assert "--system-site-packages" in render(ImageSpec(pip=["numpy"]))

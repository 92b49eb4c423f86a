"""The builder's pure rules: image ids, backend validation, and the build use case over fake ports."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
from duanflow_builder.domain import Builder, artifact_key, canonical_spec, image_id, needs_build
from duanflow_builder.ports import BuildFailedError, Emit, ImageRecord
from duanflow_proto.errors import InvalidInputError, UnavailableError
from duanflow_proto.messages.build import BuildRequest, BuildResult, ImageSpec
from duanflow_proto.messages.logs import LogLine
from hypothesis import given
from hypothesis import strategies as st

pytestmark = pytest.mark.timeout(10)


# --------------------------------------------------------------------------- image id


def test_same_spec_same_id() -> None:
    a = ImageSpec(pip=["numpy==2.0", "requests"], env={"A": "1"}, python="3.11")
    b = ImageSpec(pip=["numpy==2.0", "requests"], env={"A": "1"}, python="3.11")
    assert image_id(a) == image_id(b)
    assert image_id(a).startswith("im-") and len(image_id(a)) == 3 + 24
    int(image_id(a)[3:], 16)


def test_env_key_order_is_irrelevant() -> None:
    a = ImageSpec(env={"A": "1", "B": "2", "C": "3"})
    b = ImageSpec(env={"C": "3", "A": "1", "B": "2"})
    assert canonical_spec(a) == canonical_spec(b)
    assert image_id(a) == image_id(b)


def test_pip_order_is_relevant() -> None:
    assert image_id(ImageSpec(pip=["a", "b"])) != image_id(ImageSpec(pip=["b", "a"]))


@pytest.mark.parametrize(
    "other",
    [
        ImageSpec(python="3.12"),
        ImageSpec(pip=["x"]),
        ImageSpec(apt=["git"]),
        ImageSpec(commands=["echo"]),
        ImageSpec(env={"A": "1"}),
        ImageSpec(base="cuda", cuda="12.4"),
        ImageSpec(workdir="/app"),
    ],
)
def test_every_field_changes_the_id(other: ImageSpec) -> None:
    assert image_id(other) != image_id(ImageSpec())


@given(st.dictionaries(st.text(min_size=1, max_size=8), st.text(max_size=8), max_size=8), st.randoms())
def test_env_permutations_hash_alike(env: dict[str, str], rnd: object) -> None:
    items = list(env.items())
    rnd.shuffle(items)  # type: ignore[attr-defined]
    assert image_id(ImageSpec(env=env)) == image_id(ImageSpec(env=dict(items)))


def test_needs_build() -> None:
    assert not needs_build(ImageSpec(env={"A": "1"}, python="3.11"))
    assert needs_build(ImageSpec(pip=["x"]))


# --------------------------------------------------------------------------- use case over fakes


class FakeStore:
    def __init__(self) -> None:
        self.rows: dict[tuple[str, str], ImageRecord] = {}
        self.other_instance_building: set[str] = set()

    async def get(self, image_id: str, backend: str) -> ImageRecord | None:
        return self.rows.get((image_id, backend))

    async def claim(self, image_id: str, backend: str, spec_json: bytes, stale_after_s: float) -> bool:
        if image_id in self.other_instance_building:
            return False
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


class FakeArtifacts:
    def __init__(self) -> None:
        self.keys: list[str] = []

    async def upload(self, key: str, path: Path) -> None:
        self.keys.append(key)

    async def exists(self, key: str) -> bool:
        return key in self.keys


class FakeVenv:
    def __init__(self, fail: bool = False, lines: int = 3) -> None:
        self.builds = 0
        self.fail = fail
        self.lines = lines
        self.gate = asyncio.Event()
        self.gate.set()
        self.entered = asyncio.Event()

    async def build(self, spec: ImageSpec, emit: Emit) -> Path:
        self.builds += 1
        self.entered.set()
        await self.gate.wait()
        for i in range(self.lines):
            await emit(f"line {i}")
        if self.fail:
            raise BuildFailedError("pip said no")
        return Path("/nonexistent/image.tar.gz")

    def discard(self, path: Path) -> None:
        pass


class FakeEvents:
    def __init__(self) -> None:
        self.lines: list[LogLine] = []
        self.built: list[BuildResult] = []

    async def line(self, line: LogLine) -> None:
        self.lines.append(line)

    async def done(self, result: BuildResult) -> None:
        self.built.append(result)


class FakeClock:
    def now_ms(self) -> int:
        return 1_700_000_000_000

    def monotonic(self) -> float:
        return 0.0


@pytest.fixture
def parts() -> Iterator[tuple[FakeStore, FakeArtifacts, FakeVenv, FakeEvents]]:
    yield FakeStore(), FakeArtifacts(), FakeVenv(), FakeEvents()


def make(parts: tuple[FakeStore, FakeArtifacts, FakeVenv, FakeEvents]) -> Builder:
    store, artifacts, venv, events = parts
    return Builder(store, artifacts, venv, events, FakeClock())


async def test_pip_build_then_cached(parts: tuple[FakeStore, FakeArtifacts, FakeVenv, FakeEvents]) -> None:
    builder = make(parts)
    req = BuildRequest(spec=ImageSpec(pip=["tiny"]), app="hello", env="main")
    first = await builder.build(req)
    assert first.status == "built"
    assert first.artifact == artifact_key(first.image_id) == f"images/{first.image_id}.tar.gz"
    assert parts[1].keys == [first.artifact]
    assert [d.image_id for d in parts[3].built] == [first.image_id]
    lines = parts[3].lines
    assert lines and all(x.kind == "build" and x.source == first.image_id and x.app == "hello" for x in lines)
    assert any(x.message == "line 1" for x in lines)
    second = await builder.build(req)
    assert second.status == "cached" and second.image_id == first.image_id and second.artifact == first.artifact
    assert parts[2].builds == 1


async def test_empty_spec_needs_no_build(parts: tuple[FakeStore, FakeArtifacts, FakeVenv, FakeEvents]) -> None:
    builder = make(parts)
    res = await builder.build(BuildRequest(spec=ImageSpec(env={"A": "1"})))
    assert res.status == "built" and res.artifact == ""
    assert parts[2].builds == 0 and parts[1].keys == []
    assert (await builder.build(BuildRequest(spec=ImageSpec(env={"A": "1"})))).status == "cached"


async def test_a_lost_artifact_is_built_again(parts: tuple[FakeStore, FakeArtifacts, FakeVenv, FakeEvents]) -> None:
    _, artifacts, venv, _ = parts
    builder = make(parts)
    req = BuildRequest(spec=ImageSpec(pip=["tiny"]))
    assert (await builder.build(req)).status == "built"
    artifacts.keys.clear()  # the bucket was emptied; the record remains
    again = await builder.build(req)
    assert (again.status, venv.builds, artifacts.keys) == ("built", 2, [again.artifact])
    assert (await builder.build(req)).status == "cached"


async def test_concurrent_requests_build_once(parts: tuple[FakeStore, FakeArtifacts, FakeVenv, FakeEvents]) -> None:
    builder = make(parts)
    parts[2].gate.clear()
    req = BuildRequest(spec=ImageSpec(pip=["tiny"]))
    tasks = [asyncio.create_task(builder.build(req)) for _ in range(5)]
    await asyncio.wait_for(parts[2].entered.wait(), 5)  # one build runs; the other four wait for it
    parts[2].gate.set()
    results = await asyncio.gather(*tasks)
    assert parts[2].builds == 1
    assert sorted(r.status for r in results) == ["built", "cached", "cached", "cached", "cached"]
    assert not builder._locks  # locks of finished builds are released


async def test_failed_build_reports_tail_and_is_not_built(
    parts: tuple[FakeStore, FakeArtifacts, FakeVenv, FakeEvents],
) -> None:
    store, artifacts, _, events = parts
    venv = FakeVenv(fail=True, lines=50)
    builder = Builder(store, artifacts, venv, events, FakeClock())
    res = await builder.build(BuildRequest(spec=ImageSpec(pip=["nope"])))
    assert res.status == "failed"
    tail = res.log_tail.splitlines()
    assert len(tail) == 30 and tail[-1] == "build failed: pip said no" and tail[-2] == "line 49"
    assert store.rows[(res.image_id, "venv")].status == "failed"
    assert events.built == [] and artifacts.keys == []
    venv.fail = False
    assert (await builder.build(BuildRequest(spec=ImageSpec(pip=["nope"])))).status == "built"


@pytest.mark.parametrize(
    ("spec", "needle"),
    [
        (ImageSpec(apt=["ffmpeg"]), "apt_install"),
        (ImageSpec(commands=["make"]), "run_commands"),
    ],
)
async def test_venv_refuses_docker_only_steps(
    parts: tuple[FakeStore, FakeArtifacts, FakeVenv, FakeEvents], spec: ImageSpec, needle: str
) -> None:
    with pytest.raises(InvalidInputError, match="docker runtime") as exc:
        await make(parts).build(BuildRequest(spec=spec))
    assert needle in str(exc.value)
    assert parts[2].builds == 0 and parts[0].rows == {}


@pytest.mark.parametrize(
    "req",
    [
        BuildRequest(spec=ImageSpec(), backend="podman"),
        BuildRequest(spec=ImageSpec(pip=["--index-url=http://evil"])),
        BuildRequest(spec=ImageSpec(pip=[""])),
        BuildRequest(spec=ImageSpec(), app="not a name"),
        BuildRequest(spec=ImageSpec(), env="a.b"),
    ],
)
async def test_invalid_requests(
    parts: tuple[FakeStore, FakeArtifacts, FakeVenv, FakeEvents], req: BuildRequest
) -> None:
    with pytest.raises(InvalidInputError):
        await make(parts).build(req)


async def test_other_instance_building_is_unavailable(
    parts: tuple[FakeStore, FakeArtifacts, FakeVenv, FakeEvents],
) -> None:
    spec = ImageSpec(pip=["x"])
    parts[0].other_instance_building.add(image_id(spec))
    with pytest.raises(UnavailableError) as exc:
        await make(parts).build(BuildRequest(spec=spec))
    assert exc.value.retryable

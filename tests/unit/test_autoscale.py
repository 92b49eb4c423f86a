"""The autoscaler's pure rules (tables of cases) and one pass of its loop over in-memory ports."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, cast

import pytest
from duanflow_proto import codec, subjects
from duanflow_proto.errors import NoCapacityError
from duanflow_proto.messages.invocation import ReplicaLoad
from duanflow_proto.messages.release import AppSpec, FunctionSpec, Release
from duanflow_router import domain
from duanflow_router.autoscale import (
    OUTCOME_SCALE_DOWN,
    OUTCOME_SCALE_UP,
    Autoscaler,
    DirectLoads,
    IdleClock,
    Plan,
    desired_replicas,
    is_job,
    is_job_replica,
    plan,
)
from duanflow_router.handlers import ReplicaLoadListener
from duanflow_router.placement import Placement
from duanflow_router.ports import ConsumerLoad, ReplicaRecord
from hypothesis import given
from hypothesis import strategies as st


@pytest.mark.parametrize(
    ("backlog", "concurrency", "keep_warm", "scale_to", "expected"),
    [
        (0, 1, 0, 1, 0),
        (1, 1, 0, 1, 1),
        (5, 1, 0, 1, 1),  # scale_to caps
        (5, 1, 0, 3, 3),
        (5, 2, 0, 12, 3),  # ceil(5 / 2)
        (4, 4, 0, 12, 1),
        (0, 1, 2, 5, 2),  # keep_warm floors
        (1, 1, 2, 5, 2),
        (100, 8, 1, 10, 10),
        (3, 1, 2, 0, 2),  # a bad scale_to never caps below keep_warm
    ],
)
def test_desired_replicas(backlog: int, concurrency: int, keep_warm: int, scale_to: int, expected: int) -> None:
    assert desired_replicas(backlog, concurrency, keep_warm, scale_to) == expected


@given(
    backlog=st.integers(0, 10_000),
    concurrency=st.integers(1, 64),
    keep_warm=st.integers(0, 20),
    scale_to=st.integers(1, 50),
)
def test_desired_stays_within_keep_warm_and_scale_to(
    backlog: int, concurrency: int, keep_warm: int, scale_to: int
) -> None:
    n = desired_replicas(backlog, concurrency, keep_warm, scale_to)
    assert keep_warm <= n <= max(scale_to, keep_warm, 1)
    if keep_warm <= scale_to:
        assert n * concurrency >= min(backlog, scale_to * concurrency)


def load(pending: int = 0, ack: int = 0, delivered: int = 0) -> ConsumerLoad:
    return ConsumerLoad(pending=pending, ack_pending=ack, delivered=delivered)


@pytest.mark.parametrize(
    ("case", "running", "ld", "keep_warm", "scale_to", "idle_s", "max_starts", "expected"),
    [
        ("zero, one input", 0, load(1), 0, 3, 0, 8, Plan(start=1, reason="scale from zero")),
        ("zero, nothing", 0, load(), 0, 3, 100, 8, Plan()),
        ("backlog", 1, load(5, 1), 0, 3, 0, 8, Plan(start=2, reason="backlog 6")),
        ("backlog, bounded", 1, load(50), 0, 20, 0, 4, Plan(start=4, reason="backlog 50")),
        ("budget spent", 1, load(50), 0, 20, 0, 0, Plan()),
        ("at scale_to", 3, load(50), 0, 3, 0, 8, Plan()),
        ("keep_warm refilled", 0, load(), 2, 3, 0, 8, Plan(start=2, reason="keep_warm 2")),
        ("busy, not idle", 2, load(0, 1), 0, 3, 999, 8, Plan()),
        ("idle, window not over", 2, load(), 0, 3, 59, 8, Plan()),
        ("idle to zero", 2, load(), 0, 3, 61, 8, Plan(stop=2, reason="idle for 61s")),
        ("idle to keep_warm", 3, load(), 1, 3, 60, 8, Plan(stop=2, reason="idle for 60s")),
        ("at keep_warm, idle", 1, load(), 1, 3, 600, 8, Plan()),
        ("waiting input, idle clock", 1, load(1), 0, 3, 600, 8, Plan()),
    ],
)
def test_plan(
    case: str,
    running: int,
    ld: ConsumerLoad,
    keep_warm: int,
    scale_to: int,
    idle_s: float,
    max_starts: int,
    expected: Plan,
) -> None:
    got = plan(
        running=running,
        load=ld,
        keep_warm=keep_warm,
        scale_to=scale_to,
        concurrency=1,
        idle_s=idle_s,
        idle_window_s=60,
        max_starts=max_starts,
    )
    assert got == expected, case


def test_idle_clock_counts_from_the_last_delivery() -> None:
    clock = IdleClock()
    assert clock.observe(load(delivered=5), 100.0) == 0.0  # first read
    assert clock.observe(load(delivered=5), 130.0) == 30.0
    assert clock.observe(load(delivered=6), 131.0) == 0.0  # a new delivery restarts the window
    assert clock.observe(load(delivered=6, ack=1), 200.0) == 0.0  # in flight: not idle
    assert clock.observe(load(delivered=6), 210.0) == 10.0  # counted from the last read with work in flight
    clock.touch(220.0)
    assert clock.observe(load(delivered=6), 221.0) == 1.0


@dataclass(frozen=True)
class JobSpec:
    """Stands in for the ``job`` field another change adds to FunctionSpec."""

    job: str = "j-1"
    name: str = "train"
    kind: str = "function"


@dataclass(frozen=True)
class JobReplica:
    job_id: str = "job-1"


def test_jobs_are_recognised_defensively() -> None:
    assert not is_job(FunctionSpec(name="f"))
    assert is_job(FunctionSpec(name="f", kind="job"))
    assert is_job(cast(FunctionSpec, JobSpec()))
    assert not is_job_replica(ReplicaRecord("rp-1", "e", "a", "r", "f", "ag"))
    assert is_job_replica(cast(ReplicaRecord, JobReplica()))


def test_a_worker_scales_on_its_queue_consumer() -> None:
    worker = FunctionSpec(name="w", kind="worker", queue="inbox")
    assert domain.function_consumer("prod", "app", worker) == (
        subjects.STREAM_QUEUES,
        subjects.queue_consumer("prod", "inbox"),
    )
    assert domain.function_subject("prod", "app", worker) == subjects.queue("prod", "inbox")
    plain = FunctionSpec(name="f")
    assert domain.function_consumer("prod", "app", plain) == (
        subjects.STREAM_INVOCATIONS,
        subjects.consumer_name("prod", "app", "f"),
    )
    assert domain.function_subject("prod", "app", plain) == subjects.invocation("prod", "app", "f")


# --------------------------------------------------------------------------- one pass over in-memory ports


@dataclass
class Ports:
    """The autoscaler's ports, in memory: one release, consumer loads set by the test, replicas started at once."""

    release: Release
    loads: dict[str, ConsumerLoad] = field(default_factory=dict)
    replicas: dict[str, ReplicaRecord] = field(default_factory=dict)
    decisions: list[tuple[str, Placement, str]] = field(default_factory=list)
    watched: dict[str, Callable[[], None]] = field(default_factory=dict)
    reads: list[str] = field(default_factory=list)
    stopped: list[str] = field(default_factory=list)
    full: bool = False
    store: Any = None

    def __post_init__(self) -> None:
        self.store = self

    async def active_release_ids(self) -> list[tuple[str, str, str]]:
        return [(self.release.env, self.release.app, self.release.release_id)]

    async def active_release(self, env: str, app: str) -> Release:
        return self.release

    async def consumer_load(self, env: str, app: str, fn: FunctionSpec) -> ConsumerLoad | None:
        self.reads.append(fn.name)
        return self.loads.get(fn.name, load())

    async def watch(self, subject: str, on_message: Callable[[], None]) -> Any:
        self.watched[subject] = on_message
        ports = self

        class Sub:
            async def unsubscribe(self) -> None:
                ports.watched.pop(subject, None)

        return Sub()

    def deploying(self, env: str, app: str) -> bool:
        return False

    async def start_replica(self, release: Release, fn: FunctionSpec) -> ReplicaRecord:
        if self.full:
            raise NoCapacityError("no free capacity")
        rec = ReplicaRecord(f"rp-{len(self.replicas)}", release.env, release.app, release.release_id, fn.name, "ag")
        self.replicas[rec.replica_id] = rec
        return rec

    async def stop_replicas(self, recs: list[ReplicaRecord]) -> None:
        for rec in recs:
            self.stopped.append(rec.replica_id)
            del self.replicas[rec.replica_id]

    async def announce(
        self, env: str, app: str, release_id: str, fn: str, placement: Placement, replica_id: str = ""
    ) -> None:
        self.decisions.append((fn, placement, replica_id))


def release_of(*fns: FunctionSpec) -> Release:
    spec = AppSpec(name="shop", module="m", functions=list(fns))
    return Release(
        release_id="rel_1",
        app="shop",
        env="prod",
        created_ms=0,
        bundle_key="k",
        bundle_digest="d",
        image_id="",
        spec=spec,
    )


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def scaler(ports: Ports, clock: Clock) -> Autoscaler:
    return Autoscaler(cast(Any, ports), ports, cast(Any, ports), ports, idle_window_s=60, max_starts=8, clock=clock)


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_a_pass_scales_from_zero_on_backlog_and_back_down_when_idle() -> None:
    f = FunctionSpec(name="f", scale_to=3)
    job = FunctionSpec(name="train", kind="job", scale_to=3)
    ports, clock = Ports(release_of(f, job)), Clock()
    auto = scaler(ports, clock)

    await auto.step()  # f at zero: watched, not started; the job function is never watched or read
    assert list(ports.watched) == [subjects.invocation("prod", "shop", "f")]
    assert ports.reads == ["f"] and not ports.replicas

    ports.watched[subjects.invocation("prod", "shop", "f")]()  # the first input arrives
    await settle()
    assert len(ports.replicas) == 1 and not ports.watched
    assert ports.decisions[0][1].outcome == OUTCOME_SCALE_UP
    assert ports.decisions[0][1].reason.startswith("scale from zero")

    ports.loads["f"] = load(pending=4, ack=1, delivered=1)
    await auto.step()
    await settle()
    assert len(ports.replicas) == 3  # scale_to
    assert ports.decisions[-1][1].reason.startswith("backlog 5")
    await auto.step()
    await settle()
    assert len(ports.replicas) == 3  # never past scale_to

    ports.loads["f"] = load(delivered=9)
    await auto.step()  # the window starts
    clock.now += 61
    await auto.step()
    await settle()
    assert not ports.replicas and len(ports.stopped) == 3
    downs = [d for d in ports.decisions if d[1].outcome == OUTCOME_SCALE_DOWN]
    assert len(downs) == 3 and all(d[1].reason.startswith("idle for 61s") and d[2] for d in downs)
    await auto.step()  # at zero again: watched again
    assert list(ports.watched) == [subjects.invocation("prod", "shop", "f")]
    await auto.close()
    assert not ports.watched


async def test_no_capacity_waits_before_trying_again() -> None:
    ports, clock = Ports(release_of(FunctionSpec(name="f", scale_to=2))), Clock()
    auto = scaler(ports, clock)
    ports.full = True
    ports.loads["f"] = load(pending=2)
    await auto.step()
    await settle()
    assert not ports.replicas
    ups = len([d for d in ports.decisions if d[1].outcome == OUTCOME_SCALE_UP])
    await auto.step()
    await settle()
    assert len([d for d in ports.decisions if d[1].outcome == OUTCOME_SCALE_UP]) == ups  # backing off
    ports.full = False
    clock.now += 6
    await auto.step()
    await settle()
    assert len(ports.replicas) == 2
    await auto.close()


async def test_keep_warm_replicas_are_never_idled_away_and_job_replicas_never_counted() -> None:
    ports, clock = Ports(release_of(FunctionSpec(name="f", keep_warm=1, scale_to=2))), Clock()
    auto = scaler(ports, clock)
    await auto.step()
    await settle()
    assert len(ports.replicas) == 1  # keep_warm refilled
    clock.now += 1000
    await auto.step()
    await settle()
    assert len(ports.replicas) == 1 and not ports.stopped
    await auto.close()


async def test_an_endpoints_direct_calls_count_as_activity_and_as_load() -> None:
    """Calls the gateway hands straight to warm replicas never reach the consumer: their reports stand in."""
    f = FunctionSpec(name="f", kind="endpoint", scale_to=4, concurrency=2)
    ports, clock = Ports(release_of(f)), Clock()
    auto = scaler(ports, clock)
    ports.loads["f"] = load(pending=1)
    await auto.step()
    await settle()
    assert len(ports.replicas) == 1
    ports.loads["f"] = load(delivered=1)

    def report(busy: int, served: int) -> None:
        msg = ReplicaLoad(replica_id="rp-0", env="prod", app="shop", function="f", busy=busy, served=served)
        auto.direct.observe(msg, clock.now)

    for served in range(100, 1100, 100):  # busy for 100 s, all of it on the direct path
        clock.now += 10
        report(1, served)  # (every second, in truth; the last one counts)
        await auto.step()
        await settle()
    assert len(ports.replicas) == 1 and not ports.stopped

    report(5, 1200)  # 5 calls running, two slots each: 3 replicas
    await auto.step()
    await settle()
    assert len(ports.replicas) == 3 and ports.decisions[-1][1].reason.startswith("backlog 5")

    clock.now += 4  # the reports stop (older than their TTL): idle from now on
    await auto.step()
    clock.now += 61
    await auto.step()
    await settle()
    assert not ports.replicas and len(ports.stopped) == 3
    await auto.close()


async def test_load_reports_count_only_for_replicas_the_router_started_for_that_function() -> None:
    """A replica of another app (or a made-up id) cannot keep an endpoint warm or scale it."""
    started = {"rp-mine": ("prod", "shop", "f"), "rp-other": ("prod", "bank", "g")}

    def runs(replica_id: str, env: str, app: str, function: str) -> bool:
        return started.get(replica_id) == (env, app, function)

    loads = DirectLoads()
    listener = ReplicaLoadListener(loads, clock=lambda: 0.0, known=runs)

    async def send(replica_id: str) -> None:
        report = ReplicaLoad(replica_id=replica_id, env="prod", app="shop", function="f", busy=1, served=10)
        subject = subjects.replica_load("prod", "shop", "f")
        await listener.on_message(SimpleNamespace(subject=subject, data=codec.encode(report)))  # type: ignore[arg-type]

    await send("rp-other")  # started, but for another app
    await send("rp-made-up")
    assert loads.totals(("prod", "shop", "f"), 0.0) == (0, 0) and listener.unknown == 2
    await send("rp-mine")
    assert loads.totals(("prod", "shop", "f"), 0.0) == (1, 10) and listener.unknown == 2

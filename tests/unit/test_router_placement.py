"""Placement with prices, memory classes, regions and targets; the fleet index against the brute-force rule."""

from __future__ import annotations

import pytest
from duanflow_proto.messages.agent import CapacityReport, GpuInfo, ReplicaInfo
from duanflow_proto.messages.price import PriceUpdate
from duanflow_proto.messages.release import FunctionSpec
from duanflow_router.fleet import FleetIndex
from duanflow_router.placement import (
    PriceBook,
    nominal_mb,
    place,
    pool_name,
    request_of,
)
from hypothesis import given, settings
from hypothesis import strategies as st

GI = 1024
REPORTED = {"L4": 23034, "L40S": 46068, "A100-40G": 40960, "A100-80G": 81920, "H100": 81559, "H200": 143771}


def host(
    agent_id: str,
    layout: dict[str, int],
    *,
    region: str = "cn-shanghai",
    prices: dict[str, float] | None = None,
    busy: tuple[int, ...] = (),
    unhealthy: tuple[int, ...] = (),
    ts_ms: int = 0,
) -> CapacityReport:
    gpus: list[GpuInfo] = []
    for t, n in layout.items():
        for _ in range(n):
            i = len(gpus)
            gpus.append(
                GpuInfo(
                    index=i, uuid=f"{agent_id}-{i}", gpu_type=t, memory_total_mb=REPORTED[t], healthy=i not in unhealthy
                )
            )
    replicas = (
        [ReplicaInfo(replica_id=f"rp-{agent_id}", env="e", app="a", function="f", release="r", gpu_indices=list(busy))]
        if busy
        else []
    )
    return CapacityReport(
        agent_id=agent_id, host=agent_id, region=region, gpus=gpus, prices=prices or {}, replicas=replicas, ts_ms=ts_ms
    )


def spec(*types: str, **kw: object) -> FunctionSpec:
    return FunctionSpec(name="f", gpu=list(types), **kw)  # type: ignore[arg-type]


def test_nominal_memory_classes() -> None:
    assert nominal_mb("H100", 81559) == 80 * GI  # an "80 GB" H100 satisfies "80Gi"
    assert nominal_mb("L40S", 46068) == 48 * GI
    assert nominal_mb("H100", 40000) == 40000  # a slice is judged by what it reports
    assert nominal_mb("MYSTERY", 12345) == 12345


FLEET = [
    host("ag-sh-h100", {"H100": 8}, region="cn-shanghai", prices={"H100": 2.5}),
    host("ag-sg-a100", {"A100-80G": 8}, region="ap-singapore", prices={"A100-80G": 1.1}),
    host("ag-sg-l40s", {"L40S": 8}, region="ap-singapore", prices={"L40S": 0.9}),
    host("ag-us-h100", {"H100": 8}, region="us-east", prices={"H100": 1.0}),
    host("ag-sh-l4", {"L4": 4, "A100-40G": 4}, region="cn-shanghai", prices={"L4": 0.4, "A100-40G": 1.3}),
]

CASES = [
    # (name, spec, outcome, agent, gpu type)
    ("one type", spec("L40S"), "placed", "ag-sg-l40s", "L40S"),
    ("latency follows preference order", spec("H100", "A100-80G", "L40S"), "placed", "ag-us-h100", "H100"),
    ("price picks the cheapest", spec("H100", "A100-80G", "L40S", optimize="price"), "placed", "ag-sg-l40s", "L40S"),
    (
        "product page: 48Gi+, price, cap, regions",
        spec(
            "H100",
            "A100-80G",
            "L40S",
            gpu_memory_mb=48 * GI,
            optimize="price",
            max_price=1.20,
            region=["cn-shanghai", "ap-singapore"],
        ),
        "placed",
        "ag-sg-l40s",
        "L40S",
    ),
    (
        "exact 80Gi drops L40S",
        spec("L40S", "A100-80G", gpu_memory_mb=80 * GI, memory_exact=True),
        "placed",
        "ag-sg-a100",
        "A100-80G",
    ),
    ("80Gi floor matches an H100 reporting 81559 MiB", spec("H100", gpu_memory_mb=80 * GI), "placed", "ag-us-h100", ""),
    (
        "range 24GB..48GB",
        spec("L4", "A100-40G", "L40S", "H100", gpu_memory_mb=24 * GI, gpu_memory_max_mb=48 * GI, optimize="price"),
        "placed",
        "ag-sh-l4",
        "L4",
    ),
    ("price cap excludes all", spec("H100", max_price=0.5), "no_matching_gpu", "", ""),
    ("region excludes all", spec("L40S", region=["us-east"]), "no_matching_gpu", "", ""),
    ("count on one host", spec("L4", gpu_count=8), "no_matching_gpu", "", ""),
    ("mixed host: count of one type", spec("A100-40G", gpu_count=4), "placed", "ag-sh-l4", "A100-40G"),
    ("cpu only", FunctionSpec(name="f"), "placed", "ag-sg-a100", ""),
]


@pytest.mark.parametrize(("fn", "outcome", "agent", "gpu_type"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_placement_table(fn: FunctionSpec, outcome: str, agent: str, gpu_type: str) -> None:
    decision = place(fn, FLEET)
    assert (decision.outcome, decision.agent_id) == (outcome, agent), decision.reason
    if gpu_type:
        assert decision.gpu_type == gpu_type
    index = FleetIndex()
    for r in FLEET:
        index.observe(r)
    fast = index.choose(request_of(fn))
    assert (fast.outcome, fast.agent_id, fast.gpu_indices) == (outcome, agent, decision.gpu_indices)


def test_no_matching_gpu_says_which_constraint_excluded_what() -> None:
    decision = place(spec("H100", max_price=0.5, region=["cn-shanghai", "us-east"]), FLEET)
    assert decision.outcome == "no_matching_gpu"
    assert "region excluded 2 candidate(s)" in decision.reason
    assert "price excluded 2 candidate(s)" in decision.reason and "over the $0.50 cap" in decision.reason
    assert "type excluded 1 candidate(s)" in decision.reason
    index = FleetIndex()
    for r in FLEET:
        index.observe(r)
    fast = index.choose(request_of(spec("H100", max_price=0.5, region=["cn-shanghai", "us-east"])))
    assert fast.outcome == "no_matching_gpu"
    assert "price excluded 2 pool(s)" in fast.reason and "type excluded 4 pool(s)" in fast.reason


def test_no_capacity_is_not_no_matching_gpu() -> None:
    full = [host("ag-a", {"H100": 2}, busy=(0, 1))]
    assert place(spec("H100"), full).outcome == "no_capacity"
    assert place(spec("H100", gpu_count=4), full).outcome == "no_matching_gpu"


def test_live_price_changes_the_next_placement() -> None:
    index = FleetIndex()
    for r in FLEET:
        index.observe(r)
    req = request_of(spec("H100", "A100-80G", "L40S", optimize="price"))
    assert index.choose(req).agent_id == "ag-sg-l40s"
    touched = index.set_price(PriceUpdate(pool=pool_name("cn-shanghai", "H100"), price_per_gpu_hour=0.10))
    assert touched == 1
    decision = index.choose(req)
    assert (decision.agent_id, decision.price) == ("ag-sh-h100", 0.10)
    # an agent's own override wins over its region's pool
    index.set_price(PriceUpdate(pool="ag-us-h100", price_per_gpu_hour=0.05))
    assert index.choose(req).agent_id == "ag-us-h100"
    assert place(req, index.reports(), prices=index.prices).agent_id == "ag-us-h100"


def test_price_book_resolution_order() -> None:
    book = PriceBook()
    assert book.price("ag-a", "r1", "H100", {"h100": 2.0}) == 2.0
    assert book.price("ag-a", "r1", "L4", {}) == 0.0  # unpriced: own hardware
    book.apply(PriceUpdate(pool="r1-h100", price_per_gpu_hour=1.5))
    assert book.price("ag-a", "r1", "H100", {"H100": 2.0}) == 1.5
    book.apply(PriceUpdate(pool="ag-a", gpu_type="H100", price_per_gpu_hour=1.0))
    assert book.price("ag-a", "r1", "H100", {}) == 1.0
    assert book.price("ag-a", "r1", "L4", {"L4": 0.3}) == 0.3  # the agent override named another type


def test_latency_prefers_warm_then_cached() -> None:
    fleet = [host("ag-a", {"H100": 8}), host("ag-b", {"H100": 8}), host("ag-c", {"H100": 8})]
    fn = spec("H100")
    assert place(fn, fleet).agent_id == "ag-a"
    assert place(fn, fleet, cached={"ag-c"}).agent_id == "ag-c"
    assert place(fn, fleet, warm={"ag-b"}, cached={"ag-c"}).agent_id == "ag-b"
    index = FleetIndex()
    for r in fleet:
        index.observe(r)
    assert index.choose(request_of(fn), warm={"ag-b"}, cached={"ag-c"}).agent_id == "ag-b"
    assert index.choose(request_of(fn), cached={"ag-c"}).agent_id == "ag-c"


def test_best_fit_drains_idle_hosts() -> None:
    fleet = [host("ag-idle", {"H100": 8}), host("ag-half", {"H100": 8}, busy=(0, 1, 2, 3))]
    assert place(spec("H100", gpu_count=2), fleet).agent_id == "ag-half"
    index = FleetIndex()
    for r in fleet:
        index.observe(r)
    d = index.choose(request_of(spec("H100", gpu_count=2)))
    assert (d.agent_id, d.gpu_indices) == ("ag-half", (4, 5))


def test_reservations_and_releases() -> None:
    index = FleetIndex()
    index.observe(host("ag-a", {"H100": 1}))
    req = request_of(spec("H100"))
    d = index.choose(req)
    index.reserve(d.agent_id, d.gpu_indices)
    assert index.choose(req).outcome == "no_capacity"
    index.unreserve(d.agent_id, d.gpu_indices)
    assert index.choose(req).placed


def test_dead_agents_expire() -> None:
    index = FleetIndex()
    index.observe(host("ag-old", {"H100": 1}, ts_ms=1_000))
    index.observe(host("ag-new", {"H100": 1}, ts_ms=20_000))
    assert index.expire(now_ms=20_000) == ["ag-old"]
    assert [r.agent_id for r in index.reports()] == ["ag-new"]
    assert not index.observe(host("ag-new", {"H100": 1}, ts_ms=10_000))  # older beat ignored


# --------------------------------------------------------------------------- properties

TYPES = ["L4", "L40S", "A100-40G", "A100-80G", "H100"]
REGIONS = ["r1", "r2", "r3"]


@st.composite
def fleets(draw: st.DrawFn) -> list[CapacityReport]:
    out = []
    for i in range(draw(st.integers(0, 7))):
        layout: dict[str, int] = {}
        for t in draw(st.lists(st.sampled_from(TYPES), min_size=0, max_size=2, unique=True)):
            layout[t] = draw(st.integers(1, 4))
        n = sum(layout.values())
        busy = tuple(draw(st.lists(st.integers(0, max(0, n - 1)), unique=True, max_size=n))) if n else ()
        unhealthy = tuple(draw(st.lists(st.integers(0, max(0, n - 1)), unique=True, max_size=1))) if n else ()
        prices = {t: draw(st.sampled_from([0.0, 0.5, 1.0, 1.5, 2.5])) for t in layout}
        out.append(
            host(
                f"ag-{i}",
                layout,
                region=draw(st.sampled_from(REGIONS)),
                prices=prices,
                busy=busy,
                unhealthy=unhealthy,
            )
        )
    return out


@st.composite
def specs(draw: st.DrawFn) -> FunctionSpec:
    types = draw(st.lists(st.sampled_from(TYPES), max_size=3, unique=True))
    kw: dict[str, object] = {"gpu": types, "optimize": draw(st.sampled_from(["price", "latency"]))}
    if types:
        kw["gpu_count"] = draw(st.integers(1, 4))
        mem = draw(st.sampled_from([0, 24, 40, 48, 80]))
        kw["gpu_memory_mb"] = mem * GI
        kw["memory_exact"] = draw(st.booleans()) and mem > 0
        kw["gpu_memory_max_mb"] = draw(st.sampled_from([0, 48 * GI, 80 * GI]))
    kw["region"] = draw(st.lists(st.sampled_from(REGIONS), max_size=2, unique=True))
    kw["max_price"] = draw(st.sampled_from([None, 0.5, 1.0, 2.0]))
    return FunctionSpec(name="f", **kw)  # type: ignore[arg-type]


def _feasible_now(fn: FunctionSpec, report: CapacityReport, book: PriceBook) -> list[float]:
    """Prices of every (type, memory) on one host that satisfies every hard constraint now."""
    req = request_of(fn)
    if req.regions and report.region not in req.regions:
        return []
    held = {i for r in report.replicas for i in r.gpu_indices}
    units: dict[tuple[str, int], list[GpuInfo]] = {}
    for g in report.gpus:
        units.setdefault((g.gpu_type, nominal_mb(g.gpu_type, g.memory_total_mb)), []).append(g)
    out = []
    for (t, mb), gs in units.items():
        price = book.price(report.agent_id, report.region, t, report.prices)
        free = [g for g in gs if g.healthy and g.index not in held]
        fits = t in req.types and req.memory_ok(mb) and len(free) >= req.count
        if fits and (req.max_price is None or price <= req.max_price):
            out.append(price)
    return out


@settings(max_examples=300, deadline=None)
@given(fleet=fleets(), fn=specs(), cheap_pool=st.sampled_from([None, "r1-h100", "r2-l40s", "ag-0"]))
def test_chosen_pool_satisfies_every_hard_constraint_and_price_is_minimal(
    fleet: list[CapacityReport], fn: FunctionSpec, cheap_pool: str | None
) -> None:
    book = PriceBook()
    if cheap_pool:
        book.apply(PriceUpdate(pool=cheap_pool, price_per_gpu_hour=0.25))
    decision = place(fn, fleet, prices=book)
    req = request_of(fn)
    feasible = {r.agent_id: _feasible_now(fn, r, book) for r in fleet}
    if not req.types:
        assert decision.placed == any(not req.regions or r.region in req.regions for r in fleet)
        return
    assert decision.placed == any(feasible.values()), decision.reason
    if not decision.placed:
        return
    chosen = next(r for r in fleet if r.agent_id == decision.agent_id)
    held = {i for r in chosen.replicas for i in r.gpu_indices}
    gpus = [g for g in chosen.gpus if g.index in decision.gpu_indices]
    assert len(gpus) == req.count and len({g.gpu_type for g in gpus}) == 1
    assert gpus[0].gpu_type in req.types
    assert all(g.healthy and g.index not in held for g in gpus)
    assert all(req.memory_ok(nominal_mb(g.gpu_type, g.memory_total_mb)) for g in gpus)
    assert not req.regions or chosen.region in req.regions
    assert req.max_price is None or decision.price <= req.max_price
    if req.optimize == "price":
        cheapest = min(p for prices in feasible.values() for p in prices)
        assert decision.price == cheapest  # no feasible cheaper pool exists at decision time


@settings(max_examples=300, deadline=None)
@given(
    fleet=fleets(),
    fns=st.lists(specs(), min_size=1, max_size=6),
    cheap_pool=st.sampled_from([None, "r1-h100", "r2-l40s", "ag-1"]),
    warm=st.sets(st.sampled_from([f"ag-{i}" for i in range(7)]), max_size=2),
)
def test_index_agrees_with_brute_force_through_a_sequence_of_reservations(
    fleet: list[CapacityReport], fns: list[FunctionSpec], cheap_pool: str | None, warm: set[str]
) -> None:
    index = FleetIndex()
    for r in fleet:
        index.observe(r)
    if cheap_pool:
        index.set_price(PriceUpdate(pool=cheap_pool, price_per_gpu_hour=0.25))
    for fn in fns:
        req = request_of(fn)
        expected = place(req, index.reports(), index.reserved, index.released, prices=index.prices, warm=warm)
        got = index.choose(req, warm=warm)
        assert (got.outcome, got.agent_id, got.gpu_indices) == (
            expected.outcome,
            expected.agent_id,
            expected.gpu_indices,
        ), (expected.reason, got.reason)
        if got.placed and got.gpu_indices:
            index.reserve(got.agent_id, got.gpu_indices)


def test_control_plane_uses_the_index_on_large_fleets_and_lists_pools() -> None:
    from typing import Any, cast

    from duanflow_router.control import BRUTE_FORCE_MAX_AGENTS, ControlPlane

    fake = cast(Any, None)
    control = ControlPlane(fake, fake, fake, fake)
    fleet = [
        host(
            f"ag-{i:04d}", {"H100": 8} if i % 2 else {"L40S": 8}, region=f"r{i % 3}", prices={"H100": 2.0, "L40S": 1.0}
        )
        for i in range(BRUTE_FORCE_MAX_AGENTS + 50)
    ]
    for r in fleet:
        control.fleet.observe(r)
    fn = spec("H100", "L40S", optimize="price", region=["r1"])
    big = control._decide(fn, fleet, "main", "a", "")
    small = place(fn, fleet)
    assert (big.outcome, big.agent_id, big.gpu_indices) == (small.outcome, small.agent_id, small.gpu_indices)
    pools = [v for v in big.candidates if not v.agent_id]
    assert any("region:" in v.reason for v in pools) and any(v.accepted for v in pools)

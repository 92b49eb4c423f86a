"""The router's pure rules: release ids, the fleet view's liveness, and placement (tables of cases)."""

from __future__ import annotations

import ast
from datetime import datetime
from pathlib import Path

import pytest
from duanflow_proto import subjects
from duanflow_proto.messages.agent import CapacityReport, GpuInfo, ReplicaInfo
from duanflow_proto.messages.release import FunctionSpec
from duanflow_router import domain
from hypothesis import given
from hypothesis import strategies as st

NOW = datetime(2026, 5, 5, 18, 42, 7)


@pytest.mark.parametrize(
    ("taken", "expected"),
    [
        (set(), "rel_20260505_1842"),
        ({"rel_20260505_1841"}, "rel_20260505_1842"),
        ({"rel_20260505_1842"}, "rel_20260505_1842_2"),
        ({"rel_20260505_1842", "rel_20260505_1842_2"}, "rel_20260505_1842_3"),
        ({"rel_20260505_1842", "rel_20260505_1842_3"}, "rel_20260505_1842_2"),
    ],
)
def test_release_ids_take_the_minute_and_suffix_when_taken(taken: set[str], expected: str) -> None:
    assert domain.next_release_id(NOW, taken) == expected


def test_release_ids_are_zero_padded() -> None:
    assert domain.next_release_id(datetime(2026, 1, 2, 3, 4), set()) == "rel_20260102_0304"


@pytest.mark.parametrize(
    ("value", "ok"), [("a" * 64, True), ("A" * 64, False), ("a" * 63, False), ("g" * 64, False), ("", False)]
)
def test_digest_validation(value: str, ok: bool) -> None:
    assert domain.is_digest(value) is ok


def gpu(index: int, gpu_type: str = "H100", mem: int = 81559, *, healthy: bool = True) -> GpuInfo:
    return GpuInfo(index=index, uuid=f"sim-{gpu_type}-{index}", gpu_type=gpu_type, memory_total_mb=mem, healthy=healthy)


def agent(agent_id: str, *gpus: GpuInfo, busy: tuple[int, ...] = (), region: str = "local") -> CapacityReport:
    replicas = [ReplicaInfo(replica_id="rp-x", env="main", app="a", function="f", release="r", gpu_indices=list(busy))]
    return CapacityReport(
        agent_id=agent_id, host=agent_id, gpus=list(gpus), replicas=replicas if busy else [], region=region
    )


def fn(*types: str, count: int = 1, mem: int = 0, region: tuple[str, ...] = ()) -> FunctionSpec:
    return FunctionSpec(name="f", gpu=list(types), gpu_count=count, gpu_memory_mb=mem, region=list(region))


L4 = 23034
A100_40 = 40960
H100 = 81559

CASES = [
    # (name, function, agents, reserved, outcome, agent, gpus)
    ("cpu goes to any live agent", fn(), [agent("ag-a")], {}, "placed", "ag-a", ()),
    (
        "cpu prefers the host with fewer free GPUs",
        fn(),
        [agent("ag-gpu", gpu(0)), agent("ag-cpu")],
        {},
        "placed",
        "ag-cpu",
        (),
    ),
    (
        "type filter",
        fn("H100"),
        [agent("ag-l4", gpu(0, "L4", L4)), agent("ag-h", gpu(0, "H100"))],
        {},
        "placed",
        "ag-h",
        (0,),
    ),
    ("type match is case-insensitive", fn("h100"), [agent("ag-h", gpu(0))], {}, "placed", "ag-h", (0,)),
    ("no agent has the type", fn("B200"), [agent("ag-h", gpu(0))], {}, "no_matching_gpu", "", ()),
    ("gpu function on a cpu-only fleet", fn("L4"), [agent("ag-cpu")], {}, "no_matching_gpu", "", ()),
    (
        "count needs that many on one host",
        fn("H100", count=2),
        [agent("ag-1", gpu(0)), agent("ag-2", gpu(0), gpu(1))],
        {},
        "placed",
        "ag-2",
        (0, 1),
    ),
    (
        "count never satisfiable on one host",
        fn("H100", count=4),
        [agent("ag-1", gpu(0), gpu(1)), agent("ag-2", gpu(0), gpu(1))],
        {},
        "no_matching_gpu",
        "",
        (),
    ),
    (
        "memory floor filters small cards",
        fn("A100", mem=48 * 1024),
        [agent("ag-40", gpu(0, "A100", A100_40)), agent("ag-80", gpu(0, "A100", H100))],
        {},
        "placed",
        "ag-80",
        (0,),
    ),
    (
        "memory floor nobody meets",
        fn("A100", mem=96 * 1024),
        [agent("ag-80", gpu(0, "A100", H100))],
        {},
        "no_matching_gpu",
        "",
        (),
    ),
    (
        "best fit: the fuller host first",
        fn("H100"),
        [agent("ag-idle", gpu(0), gpu(1), gpu(2), gpu(3)), agent("ag-busy", gpu(0), gpu(1), busy=(0,))],
        {},
        "placed",
        "ag-busy",
        (1,),
    ),
    (
        "preference order beats best fit",
        fn("L40S", "H100"),
        [agent("ag-h", gpu(0, "H100")), agent("ag-l", gpu(0, "L40S", 46068), gpu(1, "L40S", 46068))],
        {},
        "placed",
        "ag-l",
        (0,),
    ),
    (
        "busy GPUs from reports are not free",
        fn("H100"),
        [agent("ag-a", gpu(0), busy=(0,))],
        {},
        "no_capacity",
        "",
        (),
    ),
    ("reserved GPUs are not free", fn("H100"), [agent("ag-a", gpu(0), gpu(1))], {"ag-a": {0}}, "placed", "ag-a", (1,)),
    ("all reserved: no capacity", fn("H100"), [agent("ag-a", gpu(0))], {"ag-a": {0}}, "no_capacity", "", ()),
    ("unhealthy GPUs are not free", fn("H100"), [agent("ag-a", gpu(0, healthy=False))], {}, "no_capacity", "", ()),
    (
        "region filter",
        fn("H100", region=("cn-shanghai",)),
        [agent("ag-us", gpu(0), region="us-east"), agent("ag-sh", gpu(0), region="cn-shanghai")],
        {},
        "placed",
        "ag-sh",
        (0,),
    ),
    ("no live agent at all", fn(), [], {}, "no_capacity", "", ()),
    (
        "ties break by agent id",
        fn("H100"),
        [agent("ag-b", gpu(0)), agent("ag-a", gpu(0))],
        {},
        "placed",
        "ag-a",
        (0,),
    ),
]


@pytest.mark.parametrize(
    ("fn_spec", "agents", "reserved", "outcome", "chosen", "gpus"),
    [c[1:] for c in CASES],
    ids=[c[0] for c in CASES],
)
def test_placement(
    fn_spec: FunctionSpec,
    agents: list[CapacityReport],
    reserved: dict[str, set[int]],
    outcome: str,
    chosen: str,
    gpus: tuple[int, ...],
) -> None:
    decision = domain.place(fn_spec, agents, reserved)
    assert (decision.outcome, decision.agent_id, decision.gpu_indices) == (outcome, chosen, gpus), decision.reason
    # Every live agent appears once among the candidates, accepted or with a reason.
    assert sorted(v.agent_id for v in decision.candidates) == sorted(a.agent_id for a in agents)
    assert all(v.reason for v in decision.candidates)
    if decision.placed:
        assert any(v.accepted and v.agent_id == chosen for v in decision.candidates)


def test_rejections_say_why() -> None:
    agents = [
        agent("ag-l4", gpu(0, "L4", L4)),
        agent("ag-small", gpu(0, "H100", 40000)),
        agent("ag-full", gpu(0, "H100"), busy=(0,)),
        agent("ag-ok", gpu(0, "H100"), gpu(1, "H100")),
    ]
    decision = domain.place(fn("H100", mem=80000), agents)
    reasons = {v.agent_id: v.reason for v in decision.candidates if not v.accepted}
    assert "no GPU of type H100" in reasons["ag-l4"] and "L4" in reasons["ag-l4"]
    assert "below the 80000 MiB floor" in reasons["ag-small"]
    assert "no free capacity" in reasons["ag-full"]
    assert decision.agent_id == "ag-ok"
    line = domain.summary_line("main", "app", "f", decision, "rp-1")
    assert line.startswith("[placed] main/app.f replica rp-1") and "ag-l4" in line


def test_no_matching_gpu_names_the_constraint() -> None:
    decision = domain.place(fn("H200", count=2), [agent("ag-h", gpu(0, "H100"))])
    assert decision.outcome == "no_matching_gpu"
    assert "2 x GPU of [H200]" in decision.reason and "no GPU of type H200" in decision.reason


def report(agent_id: str, ts_ms: int, interval_s: float = 2.0) -> CapacityReport:
    return CapacityReport(agent_id=agent_id, host="h", ts_ms=ts_ms, interval_s=interval_s)


@pytest.mark.parametrize(
    ("reports", "now_ms", "live"),
    [
        ([], 0, []),
        ([report("ag-a", 100_000)], 100_000, ["ag-a"]),
        # four intervals (8 s) plus 5 s of clock-skew allowance
        ([report("ag-a", 100_000)], 113_000, ["ag-a"]),
        ([report("ag-a", 100_000)], 113_001, []),
        ([report("ag-a", 100_000, interval_s=0.5)], 107_001, []),
        # a report from an agent whose clock runs ahead is live
        ([report("ag-a", 200_000)], 100_000, ["ag-a"]),
        # no timestamp: the bucket's TTL decides
        ([report("ag-a", 0)], 10**12, ["ag-a"]),
        # ordered by agent id, newest report per agent
        ([report("ag-b", 100_000), report("ag-a", 100_000)], 100_000, ["ag-a", "ag-b"]),
        ([report("ag-a", 90_000), report("ag-a", 100_000)], 100_000, ["ag-a"]),
    ],
)
def test_liveness_is_four_intervals_plus_skew(reports: list[CapacityReport], now_ms: int, live: list[str]) -> None:
    assert [r.agent_id for r in domain.live_reports(reports, now_ms)] == live


def test_newest_report_wins() -> None:
    old = CapacityReport(agent_id="ag-a", host="old", ts_ms=90_000)
    new = CapacityReport(agent_id="ag-a", host="new", ts_ms=95_000)
    assert [r.host for r in domain.live_reports([new, old], 95_000)] == ["new"]


def test_released_replicas_free_their_gpus() -> None:
    """GPUs of a replica the router told to stop are free even while the agent's report still lists it."""
    busy = agent("ag-a", gpu(0), busy=(0,))
    assert domain.place(fn("H100"), [busy]).outcome == "no_capacity"
    decision = domain.place(fn("H100"), [busy], released={"rp-x"})
    assert (decision.outcome, decision.gpu_indices) == ("placed", (0,))


GPU_TYPES = ["H100", "L4", "A100"]


@st.composite
def fleets(draw: st.DrawFn) -> list[CapacityReport]:
    n = draw(st.integers(min_value=0, max_value=4))
    out = []
    for i in range(n):
        gpus = [
            GpuInfo(
                index=j,
                uuid=f"u{i}-{j}",
                gpu_type=draw(st.sampled_from(GPU_TYPES)),
                memory_total_mb=draw(st.sampled_from([L4, A100_40, H100])),
                healthy=draw(st.booleans()),
            )
            for j in range(draw(st.integers(min_value=0, max_value=4)))
        ]
        busy = draw(st.lists(st.sampled_from([g.index for g in gpus]), unique=True)) if gpus else []
        out.append(agent(f"ag-{i}", *gpus, busy=tuple(busy)))
    return out


@given(
    fleet=fleets(),
    types=st.lists(st.sampled_from(GPU_TYPES), max_size=2, unique=True),
    count=st.integers(min_value=1, max_value=3),
    mem=st.sampled_from([0, 30000, 80000]),
)
def test_placement_only_hands_out_free_matching_gpus(
    fleet: list[CapacityReport], types: list[str], count: int, mem: int
) -> None:
    spec = FunctionSpec(name="f", gpu=types, gpu_count=count, gpu_memory_mb=mem)
    decision = domain.place(spec, fleet)
    assert sorted(v.agent_id for v in decision.candidates) == sorted(a.agent_id for a in fleet)
    if not decision.placed:
        assert decision.agent_id == "" and decision.gpu_indices == ()
        assert decision.outcome in ("no_capacity", "no_matching_gpu")
        return
    host = next(a for a in fleet if a.agent_id == decision.agent_id)
    if not types:
        assert decision.gpu_indices == ()
        return
    held = {i for r in host.replicas for i in r.gpu_indices}
    chosen = [g for g in host.gpus if g.index in decision.gpu_indices]
    assert len(chosen) == len(decision.gpu_indices) == count
    assert len({g.gpu_type for g in chosen}) == 1 and chosen[0].gpu_type in types
    assert all(g.healthy and g.index not in held and g.memory_total_mb >= mem for g in chosen)


def test_route_entries_cover_endpoints_only() -> None:
    from duanflow_proto.messages.release import AppSpec, EndpointSpec, Release

    spec = AppSpec(
        name="shop",
        module="shop",
        functions=[
            FunctionSpec(name="predict", kind="endpoint", timeout_s=30, endpoint=EndpointSpec(method="get", path="/p")),
            FunctionSpec(name="train"),
        ],
    )
    release = Release(
        release_id="rel_20260505_1842", app="shop", env="prod", created_ms=1, bundle_key="k", bundle_digest="d",
        image_id="", spec=spec,
    )  # fmt: skip
    routes = domain.route_entries(release)
    assert list(routes) == ["prod.shop.predict"]
    entry = routes["prod.shop.predict"]
    assert (entry.method, entry.path, entry.release, entry.timeout_s) == ("GET", "/p", "rel_20260505_1842", 30)
    assert entry.subject == subjects.invocation("prod", "shop", "predict")


TRANSPORTS = {"nats", "faststream", "asyncpg", "minio", "litestar", "duanflow_kit"}


@pytest.mark.parametrize("module", ["domain", "control", "ports", "placement", "fleet"])
def test_router_rules_import_no_transport(module: str) -> None:
    path = Path(domain.__file__).with_name(f"{module}.py")
    imported: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            imported.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    assert not imported & TRANSPORTS, f"{module}.py imports {imported & TRANSPORTS}"

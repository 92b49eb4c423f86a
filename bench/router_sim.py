"""The GPU router on a simulated fleet: decisions/s, decision latency, agreement with a brute-force oracle, and
capacity-report ingestion, with no I/O (the router's pure placement and fleet index).

``python bench/router_sim.py [--agents 10000] [--requests 100000] [--oracle-every 200] [--seed 7]``

1. builds a fleet of ``--agents`` agents x 8 GPUs in 6 regions (a mix of catalog types, some hosts mixed,
   part of the GPUs held by replicas, per-pool prices) and ingests every report through the real path
   (msgpack bytes → ``codec.decode`` → subject check → ``FleetIndex.observe``): reports/s;
   The garbage collector is tuned as the router process tunes it (``duanflow_router.app.tune_gc``);
2. places ``--requests`` requests with mixed specs (types, lists, memory floors, exact sizes and ranges, counts,
   regions, price caps, price/latency targets, impossible ones) through ``FleetIndex.choose`` and reserves what
   it picks, releasing older replicas as it goes, while prices change through ``PriceUpdate``s: decisions/s,
   median and p99 of one decision;
3. every ``--oracle-every``-th request (and every request with ``--oracle-every 1``), the brute-force rule
   (:func:`duanflow_router.placement.place` over every report) decides on the same snapshot: agreement, and its
   own median time (the floor the index is measured against).

Each figure is one JSON line on stdout: ``{"bench": "router_sim", "metric": ..., "value": ..., "unit": ...}``.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from collections import deque
from typing import Any

from duanflow_proto import codec, subjects
from duanflow_proto.messages.agent import CapacityReport, GpuInfo, ReplicaInfo
from duanflow_proto.messages.price import PriceUpdate
from duanflow_proto.messages.release import FunctionSpec
from duanflow_router.app import tune_gc
from duanflow_router.fleet import FleetIndex
from duanflow_router.placement import NOMINAL_GB, place, pool_name, request_of

REGIONS = ("cn-shanghai", "ap-singapore", "us-east", "us-west", "eu-central", "ap-tokyo")
# type, share of hosts, base $/GPU-hour, reported MiB (what NVML says, below the nominal size)
TYPES = (
    ("T4", 0.08, 0.35, 15360),
    ("L4", 0.14, 0.60, 23034),
    ("A10G", 0.10, 0.75, 23028),
    ("L40S", 0.16, 1.10, 46068),
    ("A100-40G", 0.10, 1.40, 40960),
    ("A100-80G", 0.12, 1.90, 81920),
    ("H100", 0.18, 2.50, 81559),
    ("H200", 0.08, 3.20, 143771),
    ("B200", 0.04, 4.80, 183359),
)
GPUS_PER_HOST = 8


def emit(metric: str, value: float, unit: str, **extra: Any) -> None:
    print(json.dumps({"bench": "router_sim", "metric": metric, "value": value, "unit": unit, **extra}), flush=True)


def pick_type(rng: random.Random) -> tuple[str, float, int]:
    x = rng.random()
    for name, share, price, mb in TYPES:
        x -= share
        if x <= 0:
            return name, price, mb
    name, _, price, mb = TYPES[-1]
    return name, price, mb


def make_report(rng: random.Random, i: int, ts_ms: int) -> CapacityReport:
    region = REGIONS[i % len(REGIONS)]
    layout = [pick_type(rng)]
    if rng.random() < 0.1:  # a mixed host: two types, four GPUs each
        layout.append(pick_type(rng))
    per = GPUS_PER_HOST // len(layout)
    gpus: list[GpuInfo] = []
    prices: dict[str, float] = {}
    for name, price, mb in layout:
        # Declared prices vary by region (and a few premium hosts), so groups hold a few price levels.
        prices[name] = round(price * (1 + 0.05 * (i % len(REGIONS))) * (1.2 if rng.random() < 0.05 else 1.0), 2)
        for _ in range(per):
            idx = len(gpus)
            gpus.append(
                GpuInfo(
                    index=idx,
                    uuid=f"sim-{i}-{idx}",
                    gpu_type=name,
                    memory_total_mb=mb,
                    healthy=rng.random() > 0.01,
                    simulated=True,
                )
            )
    held = [g.index for g in gpus if rng.random() < 0.45]
    replicas = []
    if held:
        replicas.append(
            ReplicaInfo(replica_id=f"rp-sim-{i}", env="main", app="bg", function="f", release="r", gpu_indices=held)
        )
    return CapacityReport(
        agent_id=f"ag-{i:05d}",
        host=f"host-{i}",
        region=region,
        gpus=gpus,
        prices=prices,
        replicas=replicas,
        simulated=True,
        ts_ms=ts_ms,
        cpu_count=128,
        memory_mb=1024 * 1024,
    )


def make_spec(rng: random.Random, n: int) -> FunctionSpec:
    names = [t[0] for t in TYPES]
    roll = rng.random()
    kw: dict[str, Any] = {"name": f"fn{n}"}
    if roll < 0.03:
        pass  # CPU only
    elif roll < 0.40:
        kw["gpu"] = [rng.choice(names)]
    elif roll < 0.75:
        kw["gpu"] = rng.sample(names, rng.randint(2, 4))
    elif roll < 0.90:  # a memory floor over a broad list ("48Gi+")
        kw["gpu"] = names
        kw["gpu_memory_mb"] = rng.choice([24, 40, 48, 80, 141]) * 1024
    elif roll < 0.95:  # a range ("24GB..80GB") or an exact size ("80Gi")
        kw["gpu"] = names
        lo = rng.choice([16, 24, 40])
        kw["gpu_memory_mb"] = lo * 1024
        if rng.random() < 0.5:
            kw["gpu_memory_max_mb"] = rng.choice([48, 80]) * 1024
        else:
            kw["memory_exact"] = True
            kw["gpu_memory_mb"] = rng.choice([24, 48, 80]) * 1024
    else:  # impossible: more GPUs than a host has, or memory no card has
        kw["gpu"] = [rng.choice(names)]
        if rng.random() < 0.5:
            kw["gpu_count"] = 16
        else:
            kw["gpu_memory_mb"] = 512 * 1024
    if "gpu" in kw and "gpu_count" not in kw:
        kw["gpu_count"] = rng.choices([1, 2, 4, 8], weights=[70, 15, 10, 5])[0]
    if rng.random() < 0.3:
        kw["region"] = rng.sample(REGIONS, rng.randint(1, 3))
    if rng.random() < 0.2:
        kw["max_price"] = round(rng.uniform(0.5, 4.0), 2)
    kw["optimize"] = "price" if rng.random() < 0.5 else "latency"
    return FunctionSpec(**kw)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agents", type=int, default=10_000)
    parser.add_argument("--requests", type=int, default=100_000)
    parser.add_argument("--oracle-every", type=int, default=200)
    parser.add_argument("--price-every", type=int, default=1_000, help="requests between price changes")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    assert set(NOMINAL_GB) >= {t[0] for t in TYPES}

    # 1. ingestion through the real decode + index path
    now_ms = int(time.time() * 1000)
    reports = [make_report(rng, i, now_ms) for i in range(args.agents)]
    wire = [(subjects.capacity(r.agent_id), codec.encode(r)) for r in reports]
    index = FleetIndex()
    started = time.perf_counter()
    for subject, data in wire:
        report = codec.decode(data, CapacityReport)
        if subjects.capacity(report.agent_id) != subject:
            raise SystemExit(f"subject mismatch for {report.agent_id}")
        index.observe(report)
    first = time.perf_counter() - started
    # Steady state: every agent reports again (a newer beat replaces the indexed one).
    wire2 = [(s, codec.encode(make_report(rng, i, now_ms + 2000))) for i, (s, _) in enumerate(wire)]
    started = time.perf_counter()
    for subject, data in wire2:
        report = codec.decode(data, CapacityReport)
        if subjects.capacity(report.agent_id) != subject:
            raise SystemExit(f"subject mismatch for {report.agent_id}")
        index.observe(report)
    again = time.perf_counter() - started
    tune_gc()  # as the router does once its fleet is loaded
    gpus = sum(len(r.gpus) for r in index.reports())
    emit("ingest_reports_per_s", round(len(wire2) / again), "reports/s", target=5000, agents=len(index), gpus=gpus)
    emit("ingest_first_reports_per_s", round(len(wire) / first), "reports/s")

    # 2 + 3. placements, with the oracle on sampled snapshots
    pools = sorted({pool_name(r.region, g.gpu_type) for r in index.reports() for g in r.gpus})
    times: list[float] = []
    oracle_times: list[float] = []
    outcomes: dict[str, int] = {}
    agree = disagree = 0
    live: deque[tuple[str, tuple[int, ...]]] = deque()
    price_changes = 0
    specs = [make_spec(rng, n) for n in range(args.requests)]
    for n, spec in enumerate(specs):
        if n and n % args.price_every == 0:
            for pool in rng.sample(pools, 8):
                index.set_price(PriceUpdate(pool=pool, price_per_gpu_hour=round(rng.uniform(0.2, 5.0), 2)))
                price_changes += 1
        req = request_of(spec)
        warm: tuple[str, ...] = ()
        if req.optimize == "latency" and live and rng.random() < 0.2:
            warm = (live[rng.randrange(len(live))][0],)
        if n % args.oracle_every == 0:
            t0 = time.perf_counter()
            expected = place(req, index.reports(), index.reserved, index.released, prices=index.prices, warm=warm)
            oracle_times.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        decision = index.choose(req, warm=warm)
        if decision.placed:
            index.reserve(decision.agent_id, decision.gpu_indices)
        times.append(time.perf_counter() - t0)
        if n % args.oracle_every == 0:
            same = (expected.outcome, expected.agent_id, expected.gpu_indices) == (
                decision.outcome,
                decision.agent_id,
                decision.gpu_indices,
            )
            if same:
                agree += 1
            else:
                disagree += 1
                print(f"disagree on {spec}: oracle {expected.reason} / index {decision.reason}", file=sys.stderr)
        outcomes[decision.outcome] = outcomes.get(decision.outcome, 0) + 1
        if decision.placed and decision.gpu_indices:
            live.append((decision.agent_id, decision.gpu_indices))
        # Replicas end too: keep the fleet from filling up for good.
        while len(live) > 20_000 or (live and rng.random() < 0.45):
            agent_id, indices = live.popleft()
            index.unreserve(agent_id, indices)
    total = sum(times)
    emit("decisions_per_s", round(len(times) / total), "decisions/s", target=20000, requests=len(times))
    emit("decision_median_ms", round(statistics.median(times) * 1000, 4), "ms")
    emit("decision_p99_ms", round(percentile(times, 0.99) * 1000, 4), "ms", target=5.0)
    emit("decision_max_ms", round(max(times) * 1000, 4), "ms")
    emit(
        "oracle_agreement",
        round(agree / max(1, agree + disagree), 6),
        "fraction",
        target=1.0,
        samples=agree + disagree,
        disagreements=disagree,
    )
    emit("oracle_decision_median_ms", round(statistics.median(oracle_times) * 1000, 3), "ms", note="brute force floor")
    emit("outcomes", len(times), "requests", price_changes=price_changes, **outcomes)
    return 0 if disagree == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())

"""Placement as pure functions: GPU requests, live prices, and the reference filter → score → tie-break.

:func:`place` is the brute-force rule over capacity reports: it judges every live agent and says why each
was rejected. :class:`duanflow_router.fleet.FleetIndex` makes the same choice from an index (the simulation
bench checks both agree on every sampled decision); both order candidates by :func:`gpu_key`.

The order of candidates (lower is better):

- ``optimize="price"``: ($/GPU-hour now, preference rank, nominal memory, free GPUs left, agent id);
- ``optimize="latency"``: (no warm replica, image not cached, preference rank, $/GPU-hour, nominal memory,
  free GPUs left, agent id);
- CPU-only: (free GPUs on the host, agent id), so GPU capacity stays available.

"Free GPUs left" is best fit: the fuller host wins, so idle hosts drain to zero.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from duanflow_proto.messages.agent import CapacityReport, GpuInfo
from duanflow_proto.messages.price import PriceUpdate
from duanflow_proto.messages.release import FunctionSpec
from duanflow_proto.messages.scheduler import CandidateVerdict

OUTCOME_PLACED = "placed"
OUTCOME_NO_CAPACITY = "no_capacity"
OUTCOME_NO_MATCHING_GPU = "no_matching_gpu"
OUTCOME_NO_RUNTIME = "no_runtime"
"""No live agent reports the replica runtime the request needs (the docker runtime, for an image only docker builds)."""

RUNTIME_DOCKER = "docker"
"""The agents' container runtime (``CapacityReport.runtimes``); every agent has the ``process`` runtime."""

OPTIMIZE_PRICE = "price"
OPTIMIZE_LATENCY = "latency"

NOMINAL_GB: Mapping[str, int] = {
    "T4": 16,
    "L4": 24,
    "A10G": 24,
    "L40S": 48,
    "A100-40G": 40,
    "A100-80G": 80,
    "H100": 80,
    "H200": 141,
    "B200": 180,
}
"""Nominal memory class per canonical GPU type (the router's copy of the catalog's sizes), GiB."""

NOMINAL_TOLERANCE = 0.9
"""A reported size within this fraction of the nominal one is that nominal class (drivers reserve some)."""

_POOL_JUNK = re.compile(r"[^a-z0-9_-]+")


def norm_type(gpu_type: str) -> str:
    """Canonical spelling used for comparisons.

    >>> norm_type(" h100 ")
    'H100'
    """
    return gpu_type.strip().upper()


def nominal_mb(gpu_type: str, reported_mb: int) -> int:
    """The memory class of one GPU in MiB: the catalog's nominal size when the report is consistent with it.

    An H100 reporting 81559 MiB is an 80 GiB card (so it satisfies ``"80Gi"``); a card reporting far less than
    its type's size (a MIG slice, a mislabeled board) is judged by what it reports.

    >>> nominal_mb("H100", 81559), nominal_mb("H100", 40000), nominal_mb("XYZ", 1234)
    (81920, 40000, 1234)
    """
    gb = NOMINAL_GB.get(norm_type(gpu_type))
    if gb is None:
        return reported_mb
    mb = gb * 1024
    if reported_mb and reported_mb < mb * NOMINAL_TOLERANCE:
        return reported_mb
    return max(mb, reported_mb)


def pool_name(region: str, gpu_type: str) -> str:
    """The price pool of one GPU type in one region: ``<region>-<type>``, lowercase.

    >>> pool_name("cn-shanghai", "A100-80G")
    'cn-shanghai-a100-80g'
    """
    return _POOL_JUNK.sub("-", f"{region}-{gpu_type}".strip().lower())


# --------------------------------------------------------------------------- requests


@dataclass(frozen=True, slots=True)
class Request:
    """A function's resource request, normalised for matching."""

    name: str
    types: tuple[str, ...] = ()
    """Acceptable canonical types in order of preference (empty: CPU only)."""
    count: int = 1
    mem_min_mb: int = 0
    mem_max_mb: int = 0
    """Upper bound of nominal memory per GPU (0: none)."""
    regions: frozenset[str] = frozenset()
    max_price: float | None = None
    optimize: str = OPTIMIZE_LATENCY
    runtime: str = ""
    """Runtime an agent must list in its report (``docker``); empty: any agent (the process runtime)."""

    def memory_ok(self, mb: int) -> bool:
        """Whether a GPU of nominal memory ``mb`` satisfies the request."""
        return mb >= self.mem_min_mb and (not self.mem_max_mb or mb <= self.mem_max_mb)

    def rank(self, gpu_type: str) -> int:
        """Preference rank of an acceptable type (-1 when not acceptable)."""
        try:
            return self.types.index(gpu_type)
        except ValueError:
            return -1

    def describe_memory(self) -> str:
        """The memory constraint in words."""
        if self.mem_max_mb and self.mem_max_mb == self.mem_min_mb:
            return f"exactly {self.mem_min_mb} MiB"
        if self.mem_max_mb:
            return f"{self.mem_min_mb}..{self.mem_max_mb} MiB"
        return f"≥ {self.mem_min_mb} MiB"


def request_of(fn: FunctionSpec, runtime: str = "") -> Request:
    """Normalise a wire ``FunctionSpec`` (as the SDK wrote it) into a :class:`Request`.

    ``runtime`` is the replica runtime its release's image needs (``docker``; empty: the process runtime).

    >>> r = request_of(FunctionSpec(name="f", gpu=["h100"], gpu_memory_mb=81920, memory_exact=True))
    >>> (r.types, r.mem_min_mb, r.mem_max_mb)
    (('H100',), 81920, 81920)
    """
    types: list[str] = []
    for t in fn.gpu:
        n = norm_type(t)
        if n and n not in types:
            types.append(n)
    mem_min = max(0, fn.gpu_memory_mb)
    mem_max = max(0, fn.gpu_memory_max_mb)
    if fn.memory_exact and mem_min:
        mem_max = mem_min
    return Request(
        name=fn.name,
        types=tuple(types),
        count=max(1, fn.gpu_count),
        mem_min_mb=mem_min,
        mem_max_mb=mem_max,
        regions=frozenset(r.strip().lower() for r in fn.region if r.strip()),
        max_price=fn.max_price,
        optimize=OPTIMIZE_PRICE if fn.optimize == OPTIMIZE_PRICE else OPTIMIZE_LATENCY,
        runtime=runtime,
    )


def describe_request(fn: FunctionSpec | Request) -> str:
    """The function's resource request in words.

    >>> describe_request(FunctionSpec(name="f", gpu=["H100", "L40S"], gpu_count=2, gpu_memory_mb=49152))
    '2 x GPU of [H100, L40S] with ≥ 49152 MiB'
    """
    req = fn if isinstance(fn, Request) else request_of(fn)
    if not req.types:
        text = "CPU only"
    else:
        mem = f" with {req.describe_memory()}" if req.mem_min_mb or req.mem_max_mb else ""
        text = f"{req.count} x GPU of [{', '.join(req.types)}]{mem}"
    if req.regions:
        text += f" in {sorted(req.regions)}"
    if req.max_price is not None:
        text += f" at ≤ ${req.max_price:.2f}/GPU-h"
    if req.types and req.optimize == OPTIMIZE_PRICE:
        text += " (cheapest first)"
    if req.runtime:
        text += f" on the {req.runtime} runtime"
    return text


# --------------------------------------------------------------------------- prices


@dataclass
class PriceBook:
    """Live $/GPU-hour overrides by pool, on top of the prices agents declare.

    A pool is ``<region>-<type>`` (:func:`pool_name`) or an agent id. An agent's own override wins over its
    region's pool, which wins over the agent's configured price; GPUs priced nowhere cost $0 (own hardware).
    """

    pools: dict[str, dict[str, float]] = field(default_factory=dict)
    """Pool → {GPU type, or "" for every type: price}."""

    def apply(self, update: PriceUpdate) -> str:
        """Record one update; returns the pool key it changed."""
        key = update.pool.strip().lower()
        self.pools.setdefault(key, {})[norm_type(update.gpu_type)] = float(update.price_per_gpu_hour)
        return key

    def price(self, agent_id: str, region: str, gpu_type: str, configured: Mapping[str, float]) -> float:
        """The price of one GPU type on one agent now."""
        t = norm_type(gpu_type)
        for key in (agent_id.lower(), pool_name(region, t)):
            pool = self.pools.get(key)
            if pool:
                p = pool.get(t, pool.get(""))
                if p is not None:
                    return p
        return configured_price(configured, t)

    def updates(self) -> list[PriceUpdate]:
        """Every override, as updates (for listing and for the prices bucket)."""
        return [
            PriceUpdate(pool=pool, gpu_type=t, price_per_gpu_hour=p)
            for pool, by_type in sorted(self.pools.items())
            for t, p in sorted(by_type.items())
        ]


def configured_price(configured: Mapping[str, float], gpu_type: str) -> float:
    """An agent's declared price for one type (keys compared case-insensitively), $0 when absent."""
    p = configured.get(gpu_type)
    if p is None:
        for k, v in configured.items():
            if norm_type(k) == gpu_type:
                return float(v)
        return 0.0
    return float(p)


# --------------------------------------------------------------------------- keys


Key = tuple[float | int | str, ...]


def gpu_key(
    req: Request, *, price: float, rank: int, mem_mb: int, free_left: int, agent_id: str, warm: bool, cached: bool
) -> Key:
    """Order of GPU candidates (lower is better); see the module docstring."""
    if req.optimize == OPTIMIZE_PRICE:
        return (price, rank, mem_mb, free_left, agent_id)
    return (0 if warm else 1, 0 if cached else 1, rank, price, mem_mb, free_left, agent_id)


def cpu_key(free_gpus: int, agent_id: str) -> Key:
    """Order of CPU-only candidates: fewest free GPUs first, so GPU capacity stays available."""
    return (free_gpus, agent_id)


# --------------------------------------------------------------------------- the reference rule


@dataclass(frozen=True)
class Placement:
    """One placement decision: the outcome, the chosen agent and GPUs, and every candidate's verdict."""

    outcome: str
    agent_id: str = ""
    gpu_indices: tuple[int, ...] = ()
    gpu_type: str = ""
    candidates: tuple[CandidateVerdict, ...] = ()
    reason: str = ""
    price: float = 0.0
    key: Key = ()

    @property
    def placed(self) -> bool:
        """True when an agent was chosen."""
        return self.outcome == OUTCOME_PLACED


# Rejection kinds, in filter order; the no_matching_gpu reason groups rejections by them.
REJECT_RUNTIME = "runtime"
REJECT_REGION = "region"
REJECT_TYPE = "type"
REJECT_MEMORY = "memory"
REJECT_COUNT = "count"
REJECT_PRICE = "price"
REJECT_CAPACITY = "capacity"


@dataclass(frozen=True, slots=True)
class Judgement:
    """One agent's verdict, the GPUs it would give, its order key, and whether it could ever fit."""

    verdict: CandidateVerdict
    indices: tuple[int, ...] = ()
    key: Key = ()
    ever: bool = False
    kind: str = ""
    price: float = 0.0


def busy_indices(report: CapacityReport, reserved: Iterable[int], released: Collection[str]) -> set[int]:
    """GPU indices of one agent that are taken: reserved by the router, or held by a replica it reports."""
    busy = set(reserved)
    for replica in report.replicas:
        if replica.state != "exited" and replica.replica_id not in released:
            busy.update(replica.gpu_indices)
    return busy


def _reject(agent: str, kind: str, reason: str, gpu_type: str = "", *, ever: bool = False) -> Judgement:
    return Judgement(CandidateVerdict(agent_id=agent, gpu_type=gpu_type, reason=reason), ever=ever, kind=kind)


def judge(
    req: Request,
    report: CapacityReport,
    busy: Collection[int],
    prices: PriceBook,
    *,
    warm: bool = False,
    cached: bool = False,
) -> Judgement:
    """Judge one agent for ``req``: filter (runtime, region, type, memory, count on one host, price cap, free) → key."""
    agent = report.agent_id
    if req.runtime and req.runtime not in report.runtimes:
        runtimes = ", ".join(report.runtimes) or "none reported"
        return _reject(agent, REJECT_RUNTIME, f"no {req.runtime} runtime (runtimes: {runtimes})")
    region = report.region.strip().lower()
    if req.regions and region not in req.regions:
        return _reject(agent, REJECT_REGION, f"region {report.region!r} not in {sorted(req.regions)}")
    if not req.types:
        free = sum(1 for g in report.gpus if g.healthy and g.index not in busy)
        verdict = CandidateVerdict(agent_id=agent, accepted=True, reason=f"cpu; {free} free GPU(s)", score=float(free))
        return Judgement(verdict, key=cpu_key(free, agent), ever=True)
    typed = [g for g in report.gpus if req.rank(norm_type(g.gpu_type)) >= 0]
    if not typed:
        have = sorted({g.gpu_type for g in report.gpus}) or ["no GPUs"]
        return _reject(agent, REJECT_TYPE, f"no GPU of type {'/'.join(req.types)} (has {', '.join(have)})")
    units: dict[tuple[str, int], list[GpuInfo]] = {}
    for g in typed:
        mb = nominal_mb(g.gpu_type, g.memory_total_mb)
        if req.memory_ok(mb):
            units.setdefault((norm_type(g.gpu_type), mb), []).append(g)
    if not units:
        most = max(nominal_mb(g.gpu_type, g.memory_total_mb) for g in typed)
        if req.mem_max_mb and most > req.mem_max_mb and req.mem_max_mb == req.mem_min_mb:
            reason = f"GPU memory {most} MiB is not the {req.mem_min_mb} MiB asked for"
        elif req.mem_max_mb and most > req.mem_max_mb:
            reason = f"GPU memory {most} MiB is outside {req.describe_memory()}"
        else:
            reason = f"GPU memory {most} MiB is below the {req.mem_min_mb} MiB floor"
        return _reject(agent, REJECT_MEMORY, reason, typed[0].gpu_type)
    sized = {u: gs for u, gs in units.items() if len(gs) >= req.count}
    if not sized:
        most_n = max(len(gs) for gs in units.values())
        reason = f"needs {req.count} GPUs of one type on one host, has {most_n} matching"
        return _reject(agent, REJECT_COUNT, reason, typed[0].gpu_type)
    priced: dict[tuple[str, int], float] = {}
    for unit in sized:
        price = prices.price(agent, region, unit[0], report.prices)
        if req.max_price is None or price <= req.max_price:
            priced[unit] = price
    if not priced:
        unit, _ = min(sized.items(), key=lambda kv: prices.price(agent, region, kv[0][0], report.prices))
        cheapest = prices.price(agent, region, unit[0], report.prices)
        reason = f"price ${cheapest:.2f}/GPU-h of {unit[0]} is over the ${req.max_price or 0:.2f} cap"
        return _reject(agent, REJECT_PRICE, reason, unit[0])
    best: tuple[Key, tuple[str, int], list[GpuInfo], int, float] | None = None
    for unit, price in priced.items():
        usable = [g for g in sized[unit] if g.healthy and g.index not in busy]
        if len(usable) < req.count:
            continue
        key = gpu_key(
            req,
            price=price,
            rank=req.rank(unit[0]),
            mem_mb=unit[1],
            free_left=len(usable) - req.count,
            agent_id=agent,
            warm=warm,
            cached=cached,
        )
        if best is None or key < best[0]:
            best = (key, unit, usable, len(usable), price)
    if best is None:
        free_n = max(sum(1 for g in sized[u] if g.healthy and g.index not in busy) for u in priced)
        total = max(len(sized[u]) for u in priced)
        reason = f"no free capacity: needs {req.count} free matching GPU(s), {free_n} free of {total}"
        gpu_type = next(iter(priced))[0]
        return _reject(agent, REJECT_CAPACITY, reason, gpu_type, ever=True)
    key, unit, usable, n_free, price = best
    chosen = sorted(usable, key=lambda g: g.index)[: req.count]
    left = n_free - req.count
    extras = [f"${price:.2f}/GPU-h"]
    if warm:
        extras.append("warm replica")
    elif cached:
        extras.append("image cached")
    verdict = CandidateVerdict(
        agent_id=agent,
        gpu_type=unit[0],
        accepted=True,
        reason=f"{req.count} x {unit[0]} free, {left} GPU(s) left free, {', '.join(extras)}",
        score=price if req.optimize == OPTIMIZE_PRICE else req.rank(unit[0]) * 1000.0 + left,
    )
    return Judgement(verdict, tuple(g.index for g in chosen), key, True, price=price)


def place(
    fn: FunctionSpec | Request,
    agents: Sequence[CapacityReport],
    reserved: Mapping[str, Iterable[int]] | None = None,
    released: Collection[str] = (),
    *,
    prices: PriceBook | None = None,
    warm: Collection[str] = (),
    cached: Collection[str] = (),
) -> Placement:
    """Choose an agent (and GPUs) for one replica among the live ``agents``: the brute-force reference.

    ``reserved`` holds GPU indices per agent already promised to replicas the reports may not show yet;
    ``released`` names replicas already told to stop, whose GPUs the reports may still show as held;
    ``warm``/``cached`` name agents running a replica of the function / holding its image (latency scoring).
    The outcome is ``placed``, ``no_capacity`` (would fit, nothing free now), ``no_runtime`` (the request needs
    a runtime, ``docker``, that no live agent reports) or ``no_matching_gpu`` (no live agent could ever fit; its
    reason groups the rejections by the constraint that excluded them).
    """
    req = fn if isinstance(fn, Request) else request_of(fn)
    reserved = reserved or {}
    book = prices or PriceBook()
    if not agents:
        return Placement(OUTCOME_NO_CAPACITY, reason=f"no agent is reporting capacity for {req.name}")
    judged: list[Judgement] = []
    for report in agents:
        busy = busy_indices(report, reserved.get(report.agent_id, ()), released)
        judged.append(judge(req, report, busy, book, warm=report.agent_id in warm, cached=report.agent_id in cached))
    verdicts = tuple(j.verdict for j in judged)
    request = describe_request(req)
    if req.runtime and all(j.kind == REJECT_RUNTIME for j in judged):
        seen = sorted({r for report in agents for r in report.runtimes}) or ["none reported"]
        hint = (
            " (an agent has it when started with DUANFLOW_AGENT_DOCKER_HOST)" if req.runtime == RUNTIME_DOCKER else ""
        )
        return Placement(
            OUTCOME_NO_RUNTIME,
            candidates=verdicts,
            reason=f"no live agent has the {req.runtime} runtime{hint} that {req.name} ({request}) needs: "
            f"{len(agents)} live agent(s) with runtimes {', '.join(seen)}",
        )
    accepted = [(j.key, i) for i, j in enumerate(judged) if j.verdict.accepted]
    if accepted:
        _, i = min(accepted)
        best = judged[i]
        agent_id = best.verdict.agent_id
        on = f" GPUs {list(best.indices)} ({best.verdict.gpu_type}, ${best.price:.2f}/GPU-h)" if best.indices else ""
        return Placement(
            OUTCOME_PLACED,
            agent_id=agent_id,
            gpu_indices=best.indices,
            gpu_type=best.verdict.gpu_type,
            candidates=verdicts,
            reason=f"placed {req.name} ({request}) on {agent_id}{on}",
            price=best.price,
            key=best.key,
        )
    if any(j.ever for j in judged):
        return Placement(
            OUTCOME_NO_CAPACITY,
            candidates=verdicts,
            reason=f"no free capacity for {req.name} ({request}) on {len(agents)} live agent(s)",
        )
    return Placement(
        OUTCOME_NO_MATCHING_GPU,
        candidates=verdicts,
        reason=f"no live agent can ever fit {req.name} ({request}): "
        + exclusions([(j.kind, j.verdict.agent_id, j.verdict.reason) for j in judged]),
    )


def exclusions(rejections: Iterable[tuple[str, str, str]], examples: int = 3) -> str:
    """Which constraint excluded what: rejections grouped by kind, with a few examples each.

    >>> exclusions([("type", "ag-a", "no GPU of type B200 (has H100)")])
    'type excluded 1 candidate(s): ag-a (no GPU of type B200 (has H100))'
    """
    groups: dict[str, list[tuple[str, str]]] = {}
    for kind, who, reason in rejections:
        groups.setdefault(kind, []).append((who, reason))
    parts = []
    for kind, items in groups.items():
        shown = ", ".join(f"{who} ({reason})" for who, reason in items[:examples])
        more = f", and {len(items) - examples} more" if len(items) > examples else ""
        parts.append(f"{kind} excluded {len(items)} candidate(s): {shown}{more}")
    return "; ".join(parts)


def summary_line(env: str, app: str, fn: str, placement: Placement, replica_id: str = "") -> str:
    """A readable one-line scheduler log message for one decision."""
    head = f"[{placement.outcome}] {env}/{app}.{fn}"
    rep = f" replica {replica_id}" if replica_id else ""
    rejected = [v for v in placement.candidates if not v.accepted]
    tail = ""
    if rejected and placement.placed:
        shown = rejected[:10]
        more = f", and {len(rejected) - len(shown)} more" if len(rejected) > len(shown) else ""
        tail = "; rejected: " + ", ".join(f"{v.agent_id} ({v.reason})" if v.agent_id else v.reason for v in shown)
        tail += more
    return f"{head}{rep}: {placement.reason}{tail}"

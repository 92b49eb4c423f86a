"""The fleet index: the live agents' capacity, indexed by GPU type, region, memory class, price and free count.

Pure data structure, no I/O. It answers a placement in time independent of the fleet's size: for each
acceptable (type, region, memory class, price) group it finds the best-fitting agent through a bitmask of
the free counts present, so a decision looks at a few dozen groups instead of every agent. Its choice is the
one :func:`duanflow_router.placement.place` makes by brute force (``bench/router_sim.py`` checks that).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field

from duanflow_proto.messages.agent import CapacityReport
from duanflow_proto.messages.price import PriceUpdate
from duanflow_proto.messages.scheduler import CandidateVerdict

from duanflow_router.placement import (
    OUTCOME_NO_CAPACITY,
    OUTCOME_NO_MATCHING_GPU,
    OUTCOME_PLACED,
    Key,
    Placement,
    PriceBook,
    Request,
    busy_indices,
    cpu_key,
    describe_request,
    gpu_key,
    nominal_mb,
    norm_type,
    pool_name,
)

LIVENESS_BEATS = 4
CLOCK_SKEW_MS = 5_000


class _Bucket:
    """Agents with the same free count in one level, with their smallest id cached."""

    __slots__ = ("agents", "least")

    def __init__(self) -> None:
        self.agents: set[str] = set()
        self.least: str | None = None

    def add(self, agent: str) -> None:
        if not self.agents or (self.least is not None and agent < self.least):
            self.least = agent
        self.agents.add(agent)

    def remove(self, agent: str) -> None:
        self.agents.discard(agent)
        if agent == self.least:
            self.least = None

    def first(self) -> str:
        if self.least is None:
            self.least = min(self.agents)
        return self.least


class _Level:
    """The agents of one group at one price: buckets by free count, and a bitmask of non-empty buckets."""

    __slots__ = ("buckets", "mask", "max_total", "totals")

    def __init__(self) -> None:
        self.buckets: dict[int, _Bucket] = {}
        self.mask = 0
        self.totals: dict[int, int] = {}
        self.max_total = 0

    def add(self, agent: str, free: int, total: int) -> None:
        bucket = self.buckets.get(free)
        if bucket is None:
            bucket = self.buckets[free] = _Bucket()
        bucket.add(agent)
        self.mask |= 1 << free
        self.totals[total] = self.totals.get(total, 0) + 1
        self.max_total = max(self.max_total, total)

    def remove(self, agent: str, free: int, total: int) -> None:
        bucket = self.buckets[free]
        bucket.remove(agent)
        if not bucket.agents:
            del self.buckets[free]
            self.mask &= ~(1 << free)
        left = self.totals[total] - 1
        if left:
            self.totals[total] = left
        else:
            del self.totals[total]
            if total == self.max_total:
                self.max_total = max(self.totals, default=0)

    def move(self, agent: str, old_free: int, new_free: int) -> None:
        """Change one agent's free count (its total unchanged)."""
        bucket = self.buckets[old_free]
        bucket.remove(agent)
        if not bucket.agents:
            del self.buckets[old_free]
            self.mask &= ~(1 << old_free)
        target = self.buckets.get(new_free)
        if target is None:
            target = self.buckets[new_free] = _Bucket()
        target.add(agent)
        self.mask |= 1 << new_free

    def best(self, count: int) -> tuple[int, str] | None:
        """(free count, agent) of the best fit with at least ``count`` free, or None."""
        m = self.mask >> count
        if not m:
            return None
        free = count + (m & -m).bit_length() - 1
        return free, self.buckets[free].first()

    def __bool__(self) -> bool:
        return bool(self.totals)


@dataclass
class _Unit:
    """GPUs of one (type, nominal memory) on one agent."""

    gpu_type: str
    mem_mb: int
    indices: tuple[int, ...]
    healthy: frozenset[int]
    free: int = 0
    price: float = 0.0


@dataclass
class _Agent:
    report: CapacityReport
    region: str
    units: dict[tuple[str, int], _Unit] = field(default_factory=dict)
    busy: set[int] = field(default_factory=set)
    free_total: int = 0


@dataclass(frozen=True, slots=True)
class PoolVerdict:
    """One (type, region, memory, price) group considered by the index, and why it was rejected."""

    gpu_type: str
    region: str
    mem_mb: int
    price: float
    agents: int
    accepted: bool
    reason: str


class FleetIndex:
    """Live agents indexed for placement; prices from a :class:`PriceBook` (shared with the caller)."""

    def __init__(self, prices: PriceBook | None = None) -> None:
        self.prices = prices if prices is not None else PriceBook()
        self.agents: dict[str, _Agent] = {}
        self.reserved: dict[str, set[int]] = {}
        self.released: set[str] = set()
        # type → (region, mem) → price → level
        self._groups: dict[str, dict[tuple[str, int], dict[float, _Level]]] = {}
        # region → level of CPU candidates (keyed by free GPUs on the host; price unused)
        self._cpu: dict[str, _Level] = {}
        self._pools: dict[str, set[str]] = {}
        self.shape = 0
        """Bumped whenever a group appears, vanishes or changes its largest host (not on free counts)."""
        self._exclusions: dict[tuple[object, ...], tuple[int, str]] = {}

    # ----------------------------------------------------------------- ingestion

    def __len__(self) -> int:
        return len(self.agents)

    def reports(self) -> list[CapacityReport]:
        """The latest report of every indexed agent, ordered by agent id."""
        return [self.agents[k].report for k in sorted(self.agents)]

    def observe(self, report: CapacityReport) -> bool:
        """Index one report (older than the one held: ignored). Returns whether it was taken."""
        held = self.agents.get(report.agent_id)
        if held is not None:
            if report.ts_ms and report.ts_ms < held.report.ts_ms:
                return False
            self._unindex(held)
        agent = _Agent(report=report, region=report.region.strip().lower())
        by_unit: dict[tuple[str, int], list[tuple[int, bool]]] = {}
        for g in report.gpus:
            t = norm_type(g.gpu_type)
            by_unit.setdefault((t, nominal_mb(t, g.memory_total_mb)), []).append((g.index, g.healthy))
        for (t, mb), gpus in by_unit.items():
            agent.units[(t, mb)] = _Unit(t, mb, tuple(i for i, _ in gpus), frozenset(i for i, ok in gpus if ok))
            self._pools.setdefault(pool_name(agent.region, t), set()).add(report.agent_id)
        self.agents[report.agent_id] = agent
        self._index(agent)
        return True

    def remove(self, agent_id: str) -> CapacityReport | None:
        """Forget one agent (dead or withdrawn); returns its last report."""
        agent = self.agents.pop(agent_id, None)
        if agent is None:
            return None
        self._unindex(agent)
        for t, _ in agent.units:
            members = self._pools.get(pool_name(agent.region, t))
            if members is not None:
                members.discard(agent_id)
        self.reserved.pop(agent_id, None)
        return agent.report

    def expire(self, now_ms: int) -> list[str]:
        """Remove agents that missed ``LIVENESS_BEATS`` beats (plus clock skew); returns their ids."""
        dead = []
        for agent_id, agent in self.agents.items():
            r = agent.report
            if r.ts_ms and now_ms - r.ts_ms > LIVENESS_BEATS * max(r.interval_s, 0.1) * 1000 + CLOCK_SKEW_MS:
                dead.append(agent_id)
        for agent_id in dead:
            self.remove(agent_id)
        return dead

    def price_of(self, agent_id: str, gpu_index: int) -> float | None:
        """The live price of one GPU of one agent (None when the agent or GPU is unknown)."""
        agent = self.agents.get(agent_id)
        if agent is None:
            return None
        for unit in agent.units.values():
            if gpu_index in unit.indices:
                return unit.price
        return None

    def set_price(self, update: PriceUpdate) -> int:
        """Apply a live price; re-prices the agents it touches at once. Returns how many were re-priced."""
        key = self.prices.apply(update)
        self.shape += 1
        touched = {key} if key in self.agents else set(self._pools.get(key, ()))
        for agent_id in touched:
            agent = self.agents[agent_id]
            self._unindex(agent)
            self._index(agent)
        return len(touched)

    def reserve(self, agent_id: str, indices: Iterable[int]) -> None:
        """Mark GPUs promised to a replica the agent's reports may not show yet."""
        self.reserved.setdefault(agent_id, set()).update(indices)
        self._refresh(agent_id)

    def unreserve(self, agent_id: str, indices: Iterable[int], replica_id: str = "") -> None:
        """Give GPUs back (replica failed to start, or stopped); ``replica_id`` stops counting its report."""
        held = self.reserved.get(agent_id)
        if held is not None:
            held.difference_update(indices)
            if not held:
                del self.reserved[agent_id]
        if replica_id:
            self.released.add(replica_id)
        self._refresh(agent_id)

    def _refresh(self, agent_id: str) -> None:
        """Re-count one agent's free GPUs after a reservation changed (prices and totals unchanged)."""
        agent = self.agents.get(agent_id)
        if agent is None:
            return
        r = agent.report
        agent.busy = busy_indices(r, self.reserved.get(agent_id, ()), self.released)
        free_total = 0
        for unit in agent.units.values():
            free = len(unit.healthy - agent.busy)
            if free != unit.free:
                level = self._groups[unit.gpu_type][(agent.region, unit.mem_mb)][unit.price]
                level.move(agent_id, unit.free, free)
                unit.free = free
            free_total += free
        if free_total != agent.free_total:
            self._cpu[agent.region].move(agent_id, agent.free_total, free_total)
            agent.free_total = free_total

    def _index(self, agent: _Agent, *, reprice: bool = True) -> None:
        r = agent.report
        agent.busy = busy_indices(r, self.reserved.get(r.agent_id, ()), self.released)
        free_total = 0
        for unit in agent.units.values():
            unit.free = len(unit.healthy - agent.busy)
            free_total += unit.free
            if reprice:
                unit.price = self.prices.price(r.agent_id, agent.region, unit.gpu_type, r.prices)
            levels = self._groups.setdefault(unit.gpu_type, {}).setdefault((agent.region, unit.mem_mb), {})
            level = levels.get(unit.price)
            if level is None:
                level = levels[unit.price] = _Level()
                self.shape += 1
            total = len(unit.indices)
            if total > level.max_total:
                self.shape += 1
            level.add(r.agent_id, unit.free, total)
        agent.free_total = free_total
        cpu = self._cpu.get(agent.region)
        if cpu is None:
            cpu = self._cpu[agent.region] = _Level()
        cpu.add(r.agent_id, free_total, 0)

    def _unindex(self, agent: _Agent) -> None:
        agent_id = agent.report.agent_id
        for unit in agent.units.values():
            levels = self._groups[unit.gpu_type][(agent.region, unit.mem_mb)]
            level = levels[unit.price]
            before = level.max_total
            level.remove(agent_id, unit.free, len(unit.indices))
            if not level:
                del levels[unit.price]
                self.shape += 1
            elif level.max_total != before:
                self.shape += 1
        self._cpu[agent.region].remove(agent_id, agent.free_total, 0)

    # ----------------------------------------------------------------- decisions

    def _agent_key(self, req: Request, agent_id: str, *, warm: bool, cached: bool) -> tuple[Key, _Unit] | None:
        agent = self.agents.get(agent_id)
        if agent is None or (req.regions and agent.region not in req.regions):
            return None
        best: tuple[Key, _Unit] | None = None
        for unit in agent.units.values():
            rank = req.rank(unit.gpu_type)
            if rank < 0 or not req.memory_ok(unit.mem_mb) or len(unit.indices) < req.count:
                continue
            if (req.max_price is not None and unit.price > req.max_price) or unit.free < req.count:
                continue
            key = gpu_key(
                req,
                price=unit.price,
                rank=rank,
                mem_mb=unit.mem_mb,
                free_left=unit.free - req.count,
                agent_id=agent_id,
                warm=warm,
                cached=cached,
            )
            if best is None or key < best[0]:
                best = (key, unit)
        return best

    def choose(self, req: Request, warm: Collection[str] = (), cached: Collection[str] = ()) -> Placement:
        """The decision for ``req`` now (no candidates listed: see :meth:`explain`). Reserves nothing."""
        if not self.agents:
            return Placement(OUTCOME_NO_CAPACITY, reason=f"no agent is reporting capacity for {req.name}")
        if not req.types:
            return self._choose_cpu(req)
        best: tuple[Key, str, _Unit] | None = None
        if req.optimize != "price":
            for group, is_warm in ((warm, True), (cached, False)):
                for agent_id in group:
                    hit = self._agent_key(req, agent_id, warm=is_warm, cached=not is_warm or agent_id in cached)
                    if hit is not None and (best is None or hit[0] < best[0]):
                        best = (hit[0], agent_id, hit[1])
                if best is not None:
                    return self._placed(req, best[1], best[2], best[0])
        ever = False
        pick: tuple[Key, str, str, int] | None = None
        pick_price = 0.0
        count, cap = req.count, req.max_price
        by_price = req.optimize == "price"
        for rank, t in enumerate(req.types):
            if pick is not None and not by_price:
                break  # latency: a less preferred type never beats a placed preferred one
            for (region, mem), levels in self._groups.get(t, {}).items():
                if (req.regions and region not in req.regions) or not req.memory_ok(mem):
                    continue
                for price, level in levels.items():
                    if (cap is not None and price > cap) or level.max_total < count:
                        continue
                    ever = True
                    if by_price and pick is not None and price > pick_price:
                        continue  # price is the first criterion: a dearer level cannot win
                    found = level.best(count)
                    if found is None:
                        continue
                    free, agent_id = found
                    key = gpu_key(
                        req,
                        price=price,
                        rank=rank,
                        mem_mb=mem,
                        free_left=free - count,
                        agent_id=agent_id,
                        warm=False,
                        cached=False,
                    )
                    if pick is None or key < pick[0]:
                        pick = (key, agent_id, t, mem)
                        pick_price = price
        if pick is not None:
            key, agent_id, t, mem = pick
            return self._placed(req, agent_id, self.agents[agent_id].units[(t, mem)], key)
        request = describe_request(req)
        if ever:
            return Placement(
                OUTCOME_NO_CAPACITY, reason=f"no free capacity for {req.name} ({request}) on {len(self)} live agent(s)"
            )
        return Placement(
            OUTCOME_NO_MATCHING_GPU,
            reason=f"no live agent can ever fit {req.name} ({request}): {self.exclusions(req)}",
        )

    def exclusions(self, req: Request, examples: int = 3) -> str:
        """Which constraint excluded which groups of the fleet, with a few examples of each.

        Only called when nothing could ever fit, which depends on the fleet's shape and prices, not on free
        counts: the text is cached per request shape until :attr:`shape` changes.
        """
        cache_key = (req.types, req.count, req.mem_min_mb, req.mem_max_mb, req.regions, req.max_price, examples)
        cached = self._exclusions.get(cache_key)
        if cached is not None and cached[0] == self.shape:
            return cached[1]
        text = self._exclusions_text(req, examples)
        if len(self._exclusions) > 4096:
            self._exclusions.clear()
        self._exclusions[cache_key] = (self.shape, text)
        return text

    def _exclusions_text(self, req: Request, examples: int) -> str:
        seen: dict[str, list[str]] = {}
        counts: dict[str, int] = {}
        for kind, why in self._rejections(req, formatted=examples):
            counts[kind] = counts.get(kind, 0) + 1
            if why is not None and len(seen.setdefault(kind, [])) < examples:
                seen[kind].append(why)
        if not counts:
            return "the fleet has no GPUs"
        parts = []
        for kind, n in counts.items():
            shown = "; ".join(seen.get(kind, []))
            parts.append(f"{kind} excluded {n} pool(s): {shown}" + (", ..." if n > examples else ""))
        return " | ".join(parts)

    def _rejections(self, req: Request, formatted: int) -> list[tuple[str, str | None]]:
        out: list[tuple[str, str | None]] = []
        made: dict[str, int] = {}
        for v in self._verdicts(req, lambda kind: made.get(kind, 0) < formatted):
            if not v.accepted:
                kind = v.reason.split(":", 1)[0]
                text = v.reason if v.agents >= 0 else None
                if text is not None:
                    made[kind] = made.get(kind, 0) + 1
                out.append((kind, text))
        return out

    def _choose_cpu(self, req: Request) -> Placement:
        pick: tuple[Key, str] | None = None
        for region, level in self._cpu.items():
            if req.regions and region not in req.regions:
                continue
            found = level.best(0)
            if found is not None:
                key = cpu_key(found[0], found[1])
                if pick is None or key < pick[0]:
                    pick = (key, found[1])
        if pick is None:
            return Placement(
                OUTCOME_NO_MATCHING_GPU,
                reason=f"no live agent can ever fit {req.name} ({describe_request(req)}): "
                f"region excluded {len(self)} agent(s) (regions: {', '.join(sorted(self._cpu))})",
            )
        agent_id = pick[1]
        return Placement(
            OUTCOME_PLACED, agent_id=agent_id, reason=f"placed {req.name} (CPU only) on {agent_id}", key=pick[0]
        )

    def _placed(self, req: Request, agent_id: str, unit: _Unit, key: Key) -> Placement:
        busy = self.agents[agent_id].busy
        indices = tuple(sorted(i for i in unit.healthy if i not in busy)[: req.count])
        verdict = CandidateVerdict(
            agent_id=agent_id,
            gpu_type=unit.gpu_type,
            accepted=True,
            reason=f"{req.count} x {unit.gpu_type} free, {unit.free - req.count} GPU(s) left free, "
            f"${unit.price:.2f}/GPU-h",
            score=unit.price,
        )
        return Placement(
            OUTCOME_PLACED,
            agent_id=agent_id,
            gpu_indices=indices,
            gpu_type=unit.gpu_type,
            candidates=(verdict,),
            reason=f"placed {req.name} on {agent_id} GPUs {list(indices)} ({unit.gpu_type}, ${unit.price:.2f}/GPU-h)",
            price=unit.price,
            key=key,
        )

    def explain(self, req: Request) -> list[PoolVerdict]:
        """Every (type, region, memory, price) group of the fleet, with why it was rejected or that it fits."""
        return self._verdicts(req, lambda kind: True)

    def _verdicts(self, req: Request, wordy: Callable[[str], bool]) -> list[PoolVerdict]:
        out: list[PoolVerdict] = []
        for t, groups in sorted(self._groups.items()):
            for (region, mem), levels in sorted(groups.items()):
                for price, level in sorted(levels.items()):
                    if req.rank(t) < 0:
                        kind = "type"
                    elif req.regions and region not in req.regions:
                        kind = "region"
                    elif not req.memory_ok(mem):
                        kind = "memory"
                    elif level.max_total < req.count:
                        kind = "count"
                    elif req.max_price is not None and price > req.max_price:
                        kind = "price"
                    elif level.best(req.count) is None:
                        kind = "capacity"
                    else:
                        kind = "fits"
                    if not wordy(kind):
                        out.append(PoolVerdict(t, region, mem, price, -1, kind == "fits", kind))
                        continue
                    n = sum(level.totals.values())
                    reason = _pool_reason(kind, req, f"{t} {mem // 1024}Gi in {region} at ${price:.2f}/GPU-h", n, level)
                    out.append(PoolVerdict(t, region, mem, price, n, kind == "fits", reason))
        return out


def _pool_reason(kind: str, req: Request, where: str, agents: int, level: _Level) -> str:
    where = f"{where} ({agents} agent(s))"
    if kind == "type":
        return f"type: {where} is not one of {'/'.join(req.types)}"
    if kind == "region":
        return f"region: {where} is not in {sorted(req.regions)}"
    if kind == "memory":
        return f"memory: {where} is not {req.describe_memory()}"
    if kind == "count":
        return f"count: {where} has at most {level.max_total} per host, needs {req.count}"
    if kind == "price":
        return f"price: {where} is over the ${req.max_price or 0:.2f} cap"
    if kind == "capacity":
        return f"capacity: {where} has no host with {req.count} free"
    return f"fits: {where}"

"""The router's rules as pure functions over plain data: release ids, the fleet view, placement.

Nothing here does I/O or imports a transport; times are passed in, so every rule is testable with
tables of cases.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime

from duanflow_proto import subjects
from duanflow_proto.messages.agent import CapacityReport, GpuInfo
from duanflow_proto.messages.release import FunctionSpec, Release, RouteEntry
from duanflow_proto.messages.scheduler import CandidateVerdict

BUNDLE_MAX_BYTES = 256 * 1024 * 1024
_DIGEST = re.compile(r"^[0-9a-f]{64}$")

OUTCOME_PLACED = "placed"
OUTCOME_NO_CAPACITY = "no_capacity"
OUTCOME_NO_MATCHING_GPU = "no_matching_gpu"

LIVENESS_BEATS = 4
CLOCK_SKEW_MS = 5_000


# --------------------------------------------------------------------------- releases and bundles


def next_release_id(now: datetime, taken: Collection[str]) -> str:
    """The id of a new release made at ``now``: ``rel_YYYYMMDD_HHMM``, or with ``_2``, ``_3``... when taken.

    >>> next_release_id(datetime(2026, 5, 5, 18, 42), {"rel_20260505_1842"})
    'rel_20260505_1842_2'
    """
    base = now.strftime("rel_%Y%m%d_%H%M")
    if base not in taken:
        return base
    n = 2
    while f"{base}_{n}" in taken:
        n += 1
    return f"{base}_{n}"


def is_digest(value: str) -> bool:
    """Whether ``value`` is a lowercase sha256 hex digest.

    >>> is_digest("0" * 64), is_digest("xyz")
    (True, False)
    """
    return bool(_DIGEST.match(value))


def bundle_key(digest: str) -> str:
    """Content-addressed S3 key of a source bundle.

    >>> bundle_key("ab" * 32)[:12]
    'bundles/abab'
    """
    return f"bundles/{digest}.zip"


def route_key(env: str, app: str, function: str) -> str:
    """Key of one endpoint's entry in the routes KV bucket: ``<env>.<app>.<function>``.

    >>> route_key("main", "shop", "predict")
    'main.shop.predict'
    """
    return f"{env}.{app}.{function}"


def route_entries(release: Release) -> dict[str, RouteEntry]:
    """The gateway's route-table entries of a release's HTTP endpoints, by :func:`route_key`."""
    entries: dict[str, RouteEntry] = {}
    for fn in release.spec.functions:
        if fn.endpoint is None:
            continue
        entries[route_key(release.env, release.app, fn.name)] = RouteEntry(
            method=fn.endpoint.method.upper(),
            path=fn.endpoint.path,
            env=release.env,
            app=release.app,
            function=fn.name,
            release=release.release_id,
            subject=subjects.invocation(release.env, release.app, fn.name),
            endpoint=fn.endpoint,
            timeout_s=fn.timeout_s,
        )
    return entries


# --------------------------------------------------------------------------- fleet view


def live_reports(reports: Iterable[CapacityReport], now_ms: int) -> list[CapacityReport]:
    """The reports of live agents, one per agent (the newest), ordered by agent id.

    An agent is live while its report is younger than four of its intervals, plus an allowance for clock
    skew between hosts (the report's ``ts_ms`` is the agent's clock). A report without ``ts_ms`` counts as
    fresh: the capacity bucket's TTL ages it out.

    >>> r = CapacityReport(agent_id="ag-a", host="h", ts_ms=1_000, interval_s=2.0)
    >>> [x.agent_id for x in live_reports([r], now_ms=9_000)], live_reports([r], now_ms=20_000)
    (['ag-a'], [])
    """
    newest: dict[str, CapacityReport] = {}
    for report in reports:
        if report.ts_ms:
            horizon_ms = LIVENESS_BEATS * max(report.interval_s, 0.1) * 1000 + CLOCK_SKEW_MS
            if now_ms - report.ts_ms > horizon_ms:
                continue
        seen = newest.get(report.agent_id)
        if seen is None or report.ts_ms >= seen.ts_ms:
            newest[report.agent_id] = report
    return [newest[k] for k in sorted(newest)]


# --------------------------------------------------------------------------- placement


@dataclass(frozen=True)
class Placement:
    """One placement decision: the outcome, the chosen agent and GPUs, and every candidate's verdict."""

    outcome: str
    agent_id: str = ""
    gpu_indices: tuple[int, ...] = ()
    gpu_type: str = ""
    candidates: tuple[CandidateVerdict, ...] = ()
    reason: str = ""

    @property
    def placed(self) -> bool:
        """True when an agent was chosen."""
        return self.outcome == OUTCOME_PLACED


def _norm(gpu_type: str) -> str:
    return gpu_type.strip().upper()


def _busy_indices(report: CapacityReport, reserved: Iterable[int], released: Collection[str]) -> set[int]:
    busy = set(reserved)
    for replica in report.replicas:
        if replica.state != "exited" and replica.replica_id not in released:
            busy.update(replica.gpu_indices)
    return busy


def describe_request(fn: FunctionSpec) -> str:
    """The function's resource request in words.

    >>> describe_request(FunctionSpec(name="f", gpu=["H100", "L40S"], gpu_count=2, gpu_memory_mb=49152))
    '2 x GPU of [H100, L40S] with ≥ 49152 MiB'
    """
    if not fn.gpu:
        return "CPU only"
    mem = f" with ≥ {fn.gpu_memory_mb} MiB" if fn.gpu_memory_mb else ""
    return f"{fn.gpu_count} x GPU of [{', '.join(fn.gpu)}]{mem}"


def _verdict_for_agent(
    fn: FunctionSpec, report: CapacityReport, busy: set[int]
) -> tuple[CandidateVerdict, tuple[int, ...], bool]:
    """Judge one agent: (verdict, chosen GPU indices, whether it could ever fit when idle)."""
    agent = report.agent_id
    if fn.region and report.region not in fn.region:
        reason = f"region {report.region!r} not in {fn.region}"
        return CandidateVerdict(agent_id=agent, reason=reason), (), False
    if not fn.gpu:
        free = sum(1 for g in report.gpus if g.healthy and g.index not in busy)
        # CPU work prefers hosts with fewer free GPUs, so GPU capacity stays available.
        verdict = CandidateVerdict(agent_id=agent, accepted=True, reason=f"cpu; {free} free GPU(s)", score=float(free))
        return verdict, (), True
    wanted = [_norm(t) for t in fn.gpu]
    count = max(1, fn.gpu_count)
    typed = [g for g in report.gpus if _norm(g.gpu_type) in wanted]
    if not typed:
        have = sorted({g.gpu_type for g in report.gpus}) or ["no GPUs"]
        reason = f"no GPU of type {'/'.join(fn.gpu)} (has {', '.join(have)})"
        return CandidateVerdict(agent_id=agent, reason=reason), (), False
    big = [g for g in typed if g.memory_total_mb >= fn.gpu_memory_mb]
    if not big:
        most = max(g.memory_total_mb for g in typed)
        reason = f"GPU memory {most} MiB is below the {fn.gpu_memory_mb} MiB floor"
        return CandidateVerdict(agent_id=agent, gpu_type=typed[0].gpu_type, reason=reason), (), False
    ever = any(sum(1 for g in big if _norm(g.gpu_type) == t) >= count for t in wanted)
    if not ever:
        reason = f"needs {count} GPUs of one type on one host, has {len(big)} matching"
        return CandidateVerdict(agent_id=agent, gpu_type=big[0].gpu_type, reason=reason), (), False
    total_free = sum(1 for g in report.gpus if g.healthy and g.index not in busy)
    for rank, t in enumerate(wanted):
        usable = [g for g in big if _norm(g.gpu_type) == t and g.healthy and g.index not in busy]
        if len(usable) < count:
            continue
        chosen = _smallest(usable, count)
        # Preference order first; then best fit: the fewest free GPUs left on the host, so idle hosts drain.
        score = rank * 1000.0 + (total_free - count)
        verdict = CandidateVerdict(
            agent_id=agent,
            gpu_type=chosen[0].gpu_type,
            accepted=True,
            reason=f"{count} x {chosen[0].gpu_type} free, {total_free - count} GPU(s) left free",
            score=score,
        )
        return verdict, tuple(g.index for g in chosen), True
    free_n = sum(1 for g in big if g.healthy and g.index not in busy)
    reason = f"no free capacity: needs {count} free matching GPU(s), {free_n} free of {len(big)}"
    return CandidateVerdict(agent_id=agent, gpu_type=big[0].gpu_type, reason=reason), (), True


def _smallest(gpus: Sequence[GpuInfo], count: int) -> list[GpuInfo]:
    """Best fit within a host: the GPUs with the least memory that still qualify, lowest index first."""
    return sorted(gpus, key=lambda g: (g.memory_total_mb, g.index))[:count]


def place(
    fn: FunctionSpec,
    agents: Sequence[CapacityReport],
    reserved: Mapping[str, Iterable[int]] | None = None,
    released: Collection[str] = (),
) -> Placement:
    """Choose an agent (and GPUs) for one replica of ``fn`` among the live ``agents``.

    ``reserved`` holds GPU indices per agent already promised to replicas the reports may not show yet;
    ``released`` names replicas already told to stop, whose GPUs the reports may still show as held.
    CPU-only functions go to any live agent; GPU functions need ``gpu_count`` free, healthy GPUs of one
    acceptable type with at least ``gpu_memory_mb`` each. Filter → score (preference order, then best fit)
    → tie-break by agent id. The outcome is ``placed``, ``no_capacity`` (would fit, nothing free now) or
    ``no_matching_gpu`` (no live agent could ever fit, or no live agent at all).
    """
    reserved = reserved or {}
    if not agents:
        return Placement(OUTCOME_NO_CAPACITY, reason=f"no agent is reporting capacity for {fn.name}")
    verdicts: list[CandidateVerdict] = []
    accepted: list[tuple[float, str, CandidateVerdict, tuple[int, ...]]] = []
    could_fit = False
    for report in agents:
        busy = _busy_indices(report, reserved.get(report.agent_id, ()), released)
        verdict, indices, ever = _verdict_for_agent(fn, report, busy)
        verdicts.append(verdict)
        could_fit = could_fit or ever
        if verdict.accepted:
            accepted.append((verdict.score, report.agent_id, verdict, indices))
    request = describe_request(fn)
    if accepted:
        _, agent_id, best, indices = min(accepted, key=lambda a: (a[0], a[1]))
        on = f" GPUs {list(indices)} ({best.gpu_type})" if indices else ""
        return Placement(
            OUTCOME_PLACED,
            agent_id=agent_id,
            gpu_indices=indices,
            gpu_type=best.gpu_type,
            candidates=tuple(verdicts),
            reason=f"placed {fn.name} ({request}) on {agent_id}{on}",
        )
    if could_fit:
        return Placement(
            OUTCOME_NO_CAPACITY,
            candidates=tuple(verdicts),
            reason=f"no free capacity for {fn.name} ({request}) on {len(agents)} live agent(s)",
        )
    return Placement(
        OUTCOME_NO_MATCHING_GPU,
        candidates=tuple(verdicts),
        reason=f"no live agent can ever fit {fn.name} ({request}): "
        + "; ".join(f"{v.agent_id}: {v.reason}" for v in verdicts),
    )


def summary_line(env: str, app: str, fn: str, placement: Placement, replica_id: str = "") -> str:
    """A readable one-line scheduler log message for one decision."""
    head = f"[{placement.outcome}] {env}/{app}.{fn}"
    rep = f" replica {replica_id}" if replica_id else ""
    rejected = [v for v in placement.candidates if not v.accepted]
    tail = ""
    if rejected and placement.placed:
        tail = "; rejected: " + ", ".join(f"{v.agent_id} ({v.reason})" for v in rejected)
    return f"{head}{rep}: {placement.reason}{tail}"

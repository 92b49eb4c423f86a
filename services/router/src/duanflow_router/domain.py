"""The router's rules as pure functions over plain data: release ids, the fleet view, placement.

Nothing here does I/O or imports a transport; times are passed in, so every rule is testable with
tables of cases.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Callable, Collection, Iterable
from datetime import datetime

from duanflow_proto import subjects
from duanflow_proto.messages.agent import CapacityReport
from duanflow_proto.messages.build import ImageSpec, needs_docker
from duanflow_proto.messages.release import AppSpec, FunctionSpec, Release, RouteEntry, bearer_digest

from duanflow_router.placement import (
    OUTCOME_NO_CAPACITY,
    OUTCOME_NO_MATCHING_GPU,
    OUTCOME_NO_RUNTIME,
    OUTCOME_PLACED,
    RUNTIME_DOCKER,
    Placement,
    describe_request,
    place,
    summary_line,
)

BUNDLE_MAX_BYTES = 256 * 1024 * 1024
_DIGEST = re.compile(r"^[0-9a-f]{64}$")


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


def bearer_token_value(spec: AppSpec, fn: FunctionSpec) -> str | None:
    """The value an endpoint's ``Auth.bearer(NAME)`` token must equal: ``NAME`` in the function's or app's env."""
    name = fn.endpoint.auth_secret if fn.endpoint is not None else None
    if not name:
        return None
    value = fn.env.get(name, spec.env.get(name))
    return value or None  # an empty token would let nobody in: refuse it at deploy instead


def route_shape(method: str, path: str) -> tuple[str, ...]:
    """What a route claims: its method and path with parameter names blanked (``/a/{x}`` ≡ ``/a/{y}``).

    >>> route_shape("post", "/v1/{id}/") == route_shape("POST", "/v1/{name}")
    True
    """
    return (method.upper(), *("{}" if s.startswith("{") else s for s in path.split("/") if s))


def route_conflicts(env: str, spec: AppSpec, existing: dict[str, RouteEntry]) -> list[str]:
    """Endpoints of ``spec`` whose method + path another app of ``env`` (or another endpoint of it) already serves."""
    claimed: dict[tuple[str, ...], str] = {}
    for entry in existing.values():
        if entry.env == env and entry.app != spec.name:
            claimed[route_shape(entry.method, entry.path)] = f"app {entry.app!r} ({entry.function})"
    problems: list[str] = []
    for fn in spec.functions:
        if fn.endpoint is None:
            continue
        shape = route_shape(fn.endpoint.method, fn.endpoint.path)
        owner = claimed.get(shape)
        if owner is not None:
            problems.append(
                f"{fn.endpoint.method.upper()} {fn.endpoint.path} of {fn.name} is already served by {owner}"
            )
        claimed[shape] = f"{fn.name} of this app"
    return problems


def route_entries(release: Release, salt: Callable[[], str] = lambda: secrets.token_hex(16)) -> dict[str, RouteEntry]:
    """The gateway's route-table entries of a release's HTTP endpoints, by :func:`route_key`.

    A bearer-auth endpoint's entry carries a fresh salt and the salted digest of its token, never the token.
    """
    entries: dict[str, RouteEntry] = {}
    for fn in release.spec.functions:
        if fn.endpoint is None:
            continue
        token = bearer_token_value(release.spec, fn)
        auth_salt = salt() if token is not None else ""
        auth_digest = bearer_digest(auth_salt, token) if token is not None else ""
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
            auth_salt=auth_salt,
            auth_digest=auth_digest,
        )
    return entries


# --------------------------------------------------------------------------- consumers


def function_consumer(env: str, app: str, fn: FunctionSpec) -> tuple[str, str]:
    """(stream, durable consumer) a function's replicas pull from: its queue's for a worker, else its own."""
    if fn.queue:
        return subjects.STREAM_QUEUES, subjects.queue_consumer(env, fn.queue)
    return subjects.STREAM_INVOCATIONS, subjects.consumer_name(env, app, fn.name)


def function_subject(env: str, app: str, fn: FunctionSpec) -> str:
    """The subject a function's inputs are published on: its queue's for a worker, else its invocation subject."""
    return subjects.queue(env, fn.queue) if fn.queue else subjects.invocation(env, app, fn.name)


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


# --------------------------------------------------------------------------- runtimes


def replica_runtime(image: ImageSpec, docker: bool = True) -> str:
    """The runtime a release's replicas need, as the builder chose its backend: ``docker`` for Debian packages or
    build commands (only docker builds them), and for a CUDA base when the stack has docker (``docker``: the router
    has the registry the builder pushes to); else empty (the process runtime, on any agent: without docker a CUDA
    image is a venv on the agent's own CUDA).

    >>> replica_runtime(ImageSpec(commands=["echo hi > /marker"])), replica_runtime(ImageSpec(pip=["numpy"]))
    ('docker', '')
    >>> replica_runtime(ImageSpec(base="cuda"), docker=True), replica_runtime(ImageSpec(base="cuda"), docker=False)
    ('docker', '')
    """
    if image.apt or image.commands:
        return RUNTIME_DOCKER
    return RUNTIME_DOCKER if docker and needs_docker(image) else ""


# --------------------------------------------------------------------------- placement (see placement.py)

__all__ = [
    "OUTCOME_NO_CAPACITY",
    "OUTCOME_NO_MATCHING_GPU",
    "OUTCOME_NO_RUNTIME",
    "OUTCOME_PLACED",
    "RUNTIME_DOCKER",
    "Placement",
    "describe_request",
    "place",
    "summary_line",
]

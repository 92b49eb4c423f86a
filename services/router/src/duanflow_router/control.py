"""The router's use cases: upload URLs, deploys, releases, lookups and the fleet view.

They orchestrate the pure rules of :mod:`duanflow_router.domain` over the ports of
:mod:`duanflow_router.ports`; no transport is imported here, so tests drive them with fakes.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import uuid
from collections.abc import Callable
from datetime import UTC, datetime

import msgspec
from duanflow_proto import subjects
from duanflow_proto.errors import (
    DuanFlowError,
    InvalidInputError,
    NoCapacityError,
    NoMatchingGpuError,
    NotFoundError,
    PayloadTooLargeError,
    UnavailableError,
    details,
)
from duanflow_proto.messages.agent import CapacityReport, FleetReply, StartReplica, StopReplica
from duanflow_proto.messages.logs import LogLine
from duanflow_proto.messages.release import (
    AppSpec,
    DeployReply,
    DeployRequest,
    FunctionLookup,
    FunctionRef,
    FunctionSpec,
    Release,
    ReleaseList,
    ReleaseListRequest,
    UploadUrlReply,
    UploadUrlRequest,
)
from duanflow_proto.messages.scheduler import SchedulerDecision

from duanflow_router import domain
from duanflow_router.ports import AgentClient, BlobStore, Platform, ReleaseStore, ReplicaRecord

log = logging.getLogger("duanflow.router")

UPLOAD_URL_TTL_S = 15 * 60
BUNDLE_URL_TTL_S = 3600
START_TIMEOUT_S = 120.0
RELEASED_MEMORY = 10_000
NO_AGENT = (
    "no agent is reporting capacity, so no replica can be placed: start an agent on a GPU host "
    "(`python -m duanflow_agent`; `duanflow dev up` starts one locally) and deploy again"
)


def _name(value: str, what: str) -> str:
    try:
        subjects.token(value)
    except ValueError as exc:
        raise InvalidInputError(f"invalid {what} name: {exc}", details=details(field=what, value=value)) from None
    return value


def _wall_now() -> datetime:
    return datetime.now(UTC)


class ControlPlane:
    """The router's state (fleet view, placed replicas) and its use cases."""

    def __init__(
        self,
        store: ReleaseStore,
        blobs: BlobStore,
        agents: AgentClient,
        platform: Platform,
        *,
        wall_now: Callable[[], datetime] = _wall_now,
        start_timeout_s: float = START_TIMEOUT_S,
    ) -> None:
        self.store = store
        self.blobs = blobs
        self.agents = agents
        self.platform = platform
        self.replicas: dict[str, ReplicaRecord] = {}
        self._wall_now = wall_now
        self._start_timeout_s = start_timeout_s
        self._deploy_locks: dict[tuple[str, str], asyncio.Lock] = {}
        # Replicas told to stop, oldest first: their GPUs count as free though reports may still list them.
        self._released: dict[str, None] = {}

    # ----------------------------------------------------------------- state

    async def load(self) -> None:
        """Rebuild the in-memory replica table from the store (at start-up)."""
        for rec in await self.store.running_replicas():
            self.replicas[rec.replica_id] = rec

    async def observe_capacity(self, report: CapacityReport) -> None:
        """Store one capacity report published on the core subject in the capacity KV bucket (the fleet view)."""
        await self.platform.put_capacity(report)

    async def live_agents(self) -> list[CapacityReport]:
        """Latest reports of the live agents, from the capacity KV bucket."""
        now_ms = int(self._wall_now().timestamp() * 1000)
        return domain.live_reports(await self.platform.capacity_reports(), now_ms)

    def reservations(self) -> dict[str, set[int]]:
        """GPU indices per agent held by replicas this router placed."""
        held: dict[str, set[int]] = {}
        for rec in self.replicas.values():
            held.setdefault(rec.agent_id, set()).update(rec.gpu_indices)
        return held

    async def health(self) -> dict[str, str]:
        """Health details: live agents and database state (raises when the database is down)."""
        await self.store.ping()
        live = str(len(await self.live_agents()))
        return {"live_agents": live, "db": "ok"}

    # ----------------------------------------------------------------- API

    async def upload_url(self, req: UploadUrlRequest) -> UploadUrlReply:
        """Where to PUT a source bundle (content-addressed), or ``exists`` when it is stored already."""
        digest = req.digest.strip().lower()
        if not domain.is_digest(digest):
            raise InvalidInputError("bundle digest must be 64 hex characters (sha256)", details=details(digest=digest))
        if req.size < 0:
            raise InvalidInputError("bundle size must not be negative", details=details(size=req.size))
        if req.size > domain.BUNDLE_MAX_BYTES:
            raise PayloadTooLargeError(
                f"bundle of {req.size} bytes is over the {domain.BUNDLE_MAX_BYTES} byte limit; "
                "keep large files (weights, data) out of the app's directory",
                details=details(size=req.size, limit=domain.BUNDLE_MAX_BYTES),
            )
        key = domain.bundle_key(digest)
        if await self.blobs.exists(key):
            return UploadUrlReply(key=key, url="", exists=True)
        return UploadUrlReply(key=key, url=await self.blobs.presign_put(key, UPLOAD_URL_TTL_S))

    async def releases(self, req: ReleaseListRequest) -> ReleaseList:
        """Releases of one app newest first, or the active release of every app."""
        _name(req.env, "env")
        if req.app:
            _name(req.app, "app")
        return ReleaseList(releases=await self.store.list_releases(req.env, req.app))

    async def lookup(self, req: FunctionLookup) -> FunctionRef:
        """The function of the active release, as callers need it."""
        _name(req.env, "env")
        _name(req.app, "app")
        release = await self.store.active_release(req.env, req.app)
        hint = "deploy it with `duanflow deploy FILE`"
        if release is None:
            raise NotFoundError(
                f"app {req.app!r} is not deployed in env {req.env!r}; {hint}",
                details=details(app=req.app, env=req.env),
            )
        for fn in release.spec.functions:
            if fn.name == req.function:
                subject = subjects.invocation(req.env, req.app, fn.name)
                return FunctionRef(app=req.app, env=req.env, release=release.release_id, spec=fn, subject=subject)
        raise NotFoundError(
            f"function {req.function!r} is not in app {req.app!r} ({req.env}, {release.release_id}); {hint}",
            details=details(app=req.app, env=req.env, function=req.function, release=release.release_id),
        )

    async def fleet_view(self) -> FleetReply:
        """Every live agent with its latest report."""
        return FleetReply(agents=await self.live_agents())

    async def deploy(self, req: DeployRequest) -> DeployReply:
        """Store an immutable release, place its replicas, then activate it and stop the previous ones."""
        self._validate(req)
        if not await self.blobs.exists(req.bundle_key):
            raise InvalidInputError(
                f"bundle {req.bundle_key} is not uploaded: ask for an upload URL and PUT the bundle first",
                details=details(bundle_key=req.bundle_key),
            )
        # One deploy per app at a time (release ids, replacing replicas); other apps deploy concurrently.
        lock = self._deploy_locks.setdefault((req.env, req.spec.name), asyncio.Lock())
        async with lock:
            return await self._deploy(req)

    # ----------------------------------------------------------------- deploy steps

    def _validate(self, req: DeployRequest) -> None:
        _name(req.env, "env")
        _name(req.spec.name, "app")
        if not req.spec.module:
            raise InvalidInputError("app spec has no module to import")
        seen: set[str] = set()
        for fn in req.spec.functions:
            _name(fn.name, "function")
            if fn.name in seen:
                raise InvalidInputError(f"function {fn.name!r} is declared twice", details=details(function=fn.name))
            seen.add(fn.name)
            if fn.gpu and fn.gpu_count < 1:
                raise InvalidInputError(f"{fn.name}: gpu_count must be at least 1", details=details(function=fn.name))
            if fn.keep_warm < 0 or fn.timeout_s <= 0 or fn.concurrency < 1 or fn.retries < 0:
                raise InvalidInputError(
                    f"{fn.name}: keep_warm and retries must be ≥ 0, timeout_s > 0, concurrency ≥ 1",
                    details=details(function=fn.name),
                )
        digest = req.bundle_digest.strip().lower()
        if not domain.is_digest(digest) or req.bundle_key != domain.bundle_key(digest):
            raise InvalidInputError(
                "bundle_digest must be the bundle's sha256 and bundle_key the key the upload URL named",
                details=details(bundle_key=req.bundle_key, bundle_digest=req.bundle_digest),
            )

    async def _deploy(self, req: DeployRequest) -> DeployReply:
        spec, env = req.spec, req.env
        live = await self.live_agents()
        if spec.functions and not live:
            for fn in spec.functions:
                await self._announce(env, spec.name, "", fn.name, domain.place(fn, live))
            raise NoCapacityError(NO_AGENT, details=details(app=spec.name, env=env, live_agents=0))
        for fn in spec.functions:
            # Refuse what can never run before anything is stored.
            verdict = domain.place(fn, live, self.reservations())
            if verdict.outcome == domain.OUTCOME_NO_MATCHING_GPU:
                await self._announce(env, spec.name, "", fn.name, verdict)
                raise NoMatchingGpuError(
                    verdict.reason,
                    details=details(
                        function=fn.name, gpu=",".join(fn.gpu), gpu_count=fn.gpu_count, gpu_memory_mb=fn.gpu_memory_mb
                    ),
                )
        release = await self._create_release(req)
        for fn in spec.functions:
            await self.platform.ensure_function_consumer(env, spec.name, fn)
        bundle_url = await self.blobs.presign_get(req.bundle_key, BUNDLE_URL_TTL_S)
        started: list[ReplicaRecord] = []
        messages: list[str] = []
        old = [r for r in await self.store.running_replicas(env, spec.name) if r.release_id != release.release_id]
        stopped_early = False
        try:
            for fn in spec.functions:
                for _ in range(max(1, fn.keep_warm)):
                    try:
                        rec, note = await self._start_one(release, fn, bundle_url)
                    except NoCapacityError:
                        if stopped_early or not old:
                            raise
                        # The old release holds the capacity (a one-GPU host): replace in place instead of
                        # blue/green, accepting a gap in service over failing the deploy.
                        stopped_early = True
                        messages.append(f"no spare capacity: stopping {len(old)} old replica(s) before starting")
                        await self._stop_all(old)
                        rec, note = await self._start_one(release, fn, bundle_url)
                    started.append(rec)
                    messages.append(note)
        except Exception as exc:
            await self._stop_all(started)
            if stopped_early:
                err = exc if isinstance(exc, DuanFlowError) else UnavailableError(f"{type(exc).__name__}: {exc}")
                note = "; the replicas of the previous release were stopped to make room: deploy again"
                raise type(err)(err.message + note, details=err.details, traceback=err.remote_traceback) from exc
            raise
        await self.store.activate(env, spec.name, release.release_id)
        routes = domain.route_entries(release)
        try:
            await self.platform.put_routes(env, spec.name, routes)
        except Exception as exc:  # the release is active; the gateway catches up on the next deploy
            log.warning("could not publish the routes of %s/%s: %s", env, spec.name, exc)
            messages.append(f"warning: the HTTP routes were not published ({exc}); deploy again")
        messages.extend(f"route {r.method} {r.path} → {r.function}" for r in routes.values())
        if not stopped_early:
            await self._stop_all(old)
        messages.extend(f"stopped replica {r.replica_id} of {r.release_id}" for r in old)
        active = msgspec.structs.replace(release, active=True)
        return DeployReply(release=active, replicas=[r.replica_id for r in started], messages=messages)

    async def _create_release(self, req: DeployRequest) -> Release:
        for _ in range(50):
            now = self._wall_now()
            prefix = now.strftime("rel_%Y%m%d_%H%M")
            taken = await self.store.release_ids(req.env, req.spec.name, prefix)
            release = Release(
                release_id=domain.next_release_id(now, taken),
                app=req.spec.name,
                env=req.env,
                created_ms=int(now.timestamp() * 1000),
                bundle_key=req.bundle_key,
                bundle_digest=req.bundle_digest.strip().lower(),
                image_id=req.image_id,
                spec=req.spec,
            )
            if await self.store.insert_release(release):
                return release
        raise UnavailableError("could not allocate a release id; retry the deploy")

    async def _start_one(self, release: Release, fn: FunctionSpec, bundle_url: str) -> tuple[ReplicaRecord, str]:
        env, app = release.env, release.app
        live = await self.live_agents()
        placement = domain.place(fn, live, self.reservations(), self._released)
        if not placement.placed:
            await self._announce(env, app, release.release_id, fn.name, placement)
            if placement.outcome == domain.OUTCOME_NO_MATCHING_GPU:
                raise NoMatchingGpuError(placement.reason, details=details(function=fn.name))
            raise NoCapacityError(placement.reason, details=details(function=fn.name, release=release.release_id))
        replica_id = f"rp-{uuid.uuid4().hex[:12]}"
        rec = ReplicaRecord(
            replica_id=replica_id,
            env=env,
            app=app,
            release_id=release.release_id,
            function=fn.name,
            agent_id=placement.agent_id,
            gpu_indices=placement.gpu_indices,
            state="starting",
        )
        # Reserve before the first await, so a concurrent deploy's placement sees these GPUs as taken.
        self.replicas[replica_id] = rec
        command = StartReplica(
            replica_id=replica_id,
            env=env,
            app=app,
            release=release.release_id,
            function=fn.name,
            module=release.spec.module,
            bundle_url=bundle_url,
            bundle_digest=release.bundle_digest,
            image_id=release.image_id,
            stream=subjects.STREAM_INVOCATIONS,
            consumer=subjects.consumer_name(env, app, fn.name),
            concurrency=fn.concurrency,
            timeout_s=fn.timeout_s,
            gpu_indices=list(placement.gpu_indices),
            env_vars=_env_vars(release.spec, fn),
        )
        try:
            await self._announce(env, app, release.release_id, fn.name, placement, replica_id)
            await self.store.record_replica(rec)
            reply = await self.agents.start_replica(placement.agent_id, command, self._start_timeout_s)
        except Exception as exc:
            self.replicas.pop(replica_id, None)
            with contextlib.suppress(Exception):  # the original failure is what the deployer needs to see
                await self.store.set_replica_state(replica_id, "failed")
            err = exc if isinstance(exc, DuanFlowError) else UnavailableError(f"{type(exc).__name__}: {exc}")
            msg = f"replica {replica_id} of {fn.name} on {placement.agent_id} did not start: {err.message}"
            raise type(err)(msg, details=err.details, traceback=err.remote_traceback) from exc
        rec = dataclasses.replace(rec, state="running")
        self.replicas[replica_id] = rec
        await self.store.record_replica(rec)
        sim = any(a.simulated for a in live if a.agent_id == placement.agent_id)
        note = f"{fn.name}: replica {replica_id} ready on {placement.agent_id} in {reply.ready_ms} ms"
        if placement.gpu_indices:
            note += f" (GPUs {list(placement.gpu_indices)} {placement.gpu_type}{', simulated' if sim else ''})"
        return rec, note

    async def _stop_all(self, replicas: list[ReplicaRecord]) -> None:
        for rec in replicas:
            try:
                await self.agents.stop_replica(rec.agent_id, StopReplica(replica_id=rec.replica_id))
            except Exception as exc:  # an unreachable agent must not fail the deploy that replaced it
                log.warning("could not stop replica %s on %s: %s", rec.replica_id, rec.agent_id, exc)
            self.replicas.pop(rec.replica_id, None)
            self._released[rec.replica_id] = None
            while len(self._released) > RELEASED_MEMORY:
                del self._released[next(iter(self._released))]
            await self.store.set_replica_state(rec.replica_id, "stopped")

    async def _announce(
        self, env: str, app: str, release_id: str, fn: str, placement: domain.Placement, replica_id: str = ""
    ) -> None:
        """Publish one decision as an event and as a ``scheduler`` log line."""
        ts_ms = int(self._wall_now().timestamp() * 1000)
        decision = SchedulerDecision(
            ts_ms=ts_ms,
            env=env,
            app=app,
            function=fn,
            outcome=placement.outcome,
            chosen_agent=placement.agent_id,
            gpu_indices=list(placement.gpu_indices),
            replica_id=replica_id,
            candidates=list(placement.candidates),
            reason=placement.reason,
        )
        line = LogLine(
            ts_ms=ts_ms,
            env=env,
            app=app,
            kind="scheduler",
            source="router",
            message=domain.summary_line(env, app, fn, placement, replica_id),
            level="info" if placement.placed else "warning",
            release=release_id,
            function=fn,
            replica=replica_id,
        )
        log.info("%s", line.message)
        try:
            await self.platform.publish_decision(decision)
            await self.platform.publish_log(line)
        except Exception as exc:  # losing an event must not fail a deploy
            log.warning("could not publish scheduler decision: %s", exc)


def _env_vars(spec: AppSpec, fn: FunctionSpec) -> dict[str, str]:
    return {**spec.env, **fn.env}

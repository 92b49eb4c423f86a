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
    ConflictError,
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
from duanflow_proto.messages.build import ImageSpec
from duanflow_proto.messages.invocation import PayloadUrlReply, PayloadUrlRequest
from duanflow_proto.messages.jobs import ENV_JOB_ID
from duanflow_proto.messages.logs import LogLine
from duanflow_proto.messages.price import PriceList, PriceUpdate
from duanflow_proto.messages.release import (
    AppSpec,
    AppStopReply,
    AppStopRequest,
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
from duanflow_proto.messages.scheduler import CandidateVerdict, SchedulerDecision

from duanflow_router import domain
from duanflow_router.fleet import FleetIndex
from duanflow_router.placement import PriceBook, norm_type, request_of
from duanflow_router.ports import AgentClient, AgentGoneError, BlobStore, Platform, ReleaseStore, ReplicaRecord
from duanflow_router.replica_setup import ReplicaExtras, ReplicaSetup

log = logging.getLogger("duanflow.router")

UPLOAD_URL_TTL_S = 15 * 60
PAYLOAD_MAX_BYTES = 2 * 1024**3
"""Largest argument or result that travels through S3."""
BUNDLE_URL_TTL_S = 3600
START_TIMEOUT_S = 120.0
CAPACITY_WAIT_S = 60.0
"""How long a deploy waits (with backoff, logging ``no_capacity`` each time) for GPUs that fit but are taken."""
CAPACITY_BACKOFF_S = (0.5, 1.0, 2.0, 4.0, 8.0)
REPLACE_RETRY_S = 5.0
PRICE_HYSTERESIS = 0.10
"""A price-optimised replica moves only to a pool cheaper by more than this fraction (no flapping)."""
RELEASED_MEMORY = 10_000
BRUTE_FORCE_MAX_AGENTS = 256
"""Up to this many live agents a decision judges every agent (the event lists each); beyond, the index decides."""
MAX_PRICE_PER_GPU_HOUR = 10_000.0
MAX_LEFT_AGENTS = 10_000
"""Agents remembered as having left (their late reports are ignored); the oldest are forgotten first."""
GONE_AGENT_RETRIES = 3
"""Agents found dead while placing one replica before the next such failure goes to the caller."""
WARNING_OUTCOMES = (domain.OUTCOME_NO_CAPACITY, domain.OUTCOME_NO_MATCHING_GPU, domain.OUTCOME_NO_RUNTIME)
"""Decisions logged as warnings (placements and scaling decisions are info)."""
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
        capacity_wait_s: float = CAPACITY_WAIT_S,
    ) -> None:
        self.store = store
        self.blobs = blobs
        self.agents = agents
        self.platform = platform
        self.replicas: dict[str, ReplicaRecord] = {}
        self._wall_now = wall_now
        self._start_timeout_s = start_timeout_s
        self._capacity_wait_s = capacity_wait_s
        self._deploy_locks: dict[tuple[str, str], asyncio.Lock] = {}
        # Replicas told to stop, oldest first: their GPUs count as free though reports may still list them.
        self._released: dict[str, None] = {}
        self.prices = PriceBook()
        self.fleet = FleetIndex(self.prices)
        self.dead_agents: list[str] = []
        self._left: dict[str, int] = {}
        """Agents that said they are leaving, with the time of that report (reports no newer are ignored)."""
        self._unplaced: list[ReplicaRecord] = []
        self._prices_changed = False
        self.rebalance_passes = 0
        """Rebalance passes run so far (one per sweep after a price change)."""
        self.setup: ReplicaSetup | None = None
        """Secrets and images of replicas (:mod:`duanflow_router.replica_setup`); None: plain env only."""
        self._retry_at = 0.0
        self.job_replicas: set[str] = set()
        """Replicas dedicated to one ``@app.job`` run (:mod:`duanflow_router.jobs`): deploys leave them running."""

    # ----------------------------------------------------------------- state

    async def load(self) -> None:
        """Rebuild state at start-up: placed replicas from the store, live prices and the fleet from the buckets."""
        for rec in await self.store.running_replicas():
            self.replicas[rec.replica_id] = rec
            self.fleet.reserve(rec.agent_id, rec.gpu_indices)
        for update in await self.platform.stored_prices():
            self.prices.apply(update)
        await self.live_agents()

    def _now_ms(self) -> int:
        return int(self._wall_now().timestamp() * 1000)

    async def observe_capacity(self, report: CapacityReport) -> None:
        """Index one capacity report published on the core subject and store it in the capacity KV bucket.

        A ``leaving`` report (an agent stopping) takes the agent out of the index and the bucket at once; a report
        of it that is not newer (one still in flight when it left) is then ignored instead of storing it again.
        """
        left = self._left.get(report.agent_id)
        if left is not None:
            if report.ts_ms <= left and not report.leaving:
                return
            del self._left[report.agent_id]  # restarted under the same id
        if report.leaving:
            await self._drop_agent(report.agent_id, report.ts_ms)
            log.info("agent %s is leaving: out of the fleet", report.agent_id)
            return
        self.fleet.observe(report)
        await self.platform.put_capacity(report)

    async def _drop_agent(self, agent_id: str, as_of_ms: int) -> None:
        """Take an agent out of the fleet and the capacity bucket; its reports up to ``as_of_ms`` are ignored."""
        self._left[agent_id] = as_of_ms
        while len(self._left) > MAX_LEFT_AGENTS:
            del self._left[next(iter(self._left))]
        self.fleet.remove(agent_id)
        await self.platform.delete_capacity(agent_id)

    async def live_agents(self) -> list[CapacityReport]:
        """Latest reports of the live agents: the capacity KV bucket and the reports this router heard on the
        capacity subject (the fleet index), the newest per agent, synced into the index.

        The index makes a listing of the bucket that misses keys harmless (nats-py's ``keys()`` was seen coming back
        empty under load with agents beating); agents gone from both (withdrawn, left, or silent past their
        liveness horizon) leave the index.
        """
        stored = await self.platform.capacity_reports()
        live = [
            r
            for r in domain.live_reports([*stored, *self.fleet.reports()], self._now_ms())
            if r.ts_ms > self._left.get(r.agent_id, -1)
        ]
        present = {r.agent_id for r in live}
        for report in live:
            self.fleet.observe(report)
        for agent_id in [a for a in self.fleet.agents if a not in present]:
            self.fleet.remove(agent_id)
        return live

    async def sweep(self) -> list[ReplicaRecord]:
        """Liveness sweep (the active router, every tick): re-place the replicas of dead agents.

        An agent that missed ``LIVENESS_BEATS`` beats (or left the capacity bucket) is dead: its replicas are
        marked ``lost`` and their GPUs released, and each one of the active release is started again on a live
        agent (the invocations it had in flight were never acked, so the consumer redelivers them).
        """
        # The index, fed by every report on the capacity subject, is the view here: reading the whole capacity
        # bucket every tick would cost one KV read per agent per second on a large fleet.
        dead = set(self.fleet.expire(self._now_ms()))
        lost = [r for r in self.replicas.values() if r.agent_id not in self.fleet.agents]
        dead.update(r.agent_id for r in lost)
        if dead:
            self.dead_agents.extend(sorted(dead))
            del self.dead_agents[:-100]
        replaced: list[ReplicaRecord] = []
        for rec in lost:
            self._unreserve(rec.replica_id, stopped=True)
            with contextlib.suppress(Exception):
                await self.store.set_replica_state(rec.replica_id, "lost")
            log.warning(
                "agent %s is dead: re-placing replica %s of %s/%s.%s",
                rec.agent_id,
                rec.replica_id,
                rec.env,
                rec.app,
                rec.function,
            )
        now = asyncio.get_running_loop().time()
        retry = [r for r in self._unplaced if now >= self._retry_at]
        if retry:
            self._unplaced = [r for r in self._unplaced if r not in retry]
        for rec in [*lost, *retry]:
            release = await self.store.active_release(rec.env, rec.app)
            if release is None or release.release_id != rec.release_id:
                continue
            fn = next((f for f in release.spec.functions if f.name == rec.function), None)
            if fn is None or fn.job is not None:  # a job's lost replica: the job fails (jobs.py), no re-place
                continue
            try:
                url = await self.blobs.presign_get(release.bundle_key, BUNDLE_URL_TTL_S)
                new, note = await self._start_one(release, fn, url)
            except DuanFlowError as exc:  # announced as a scheduler decision; retried a few sweeps later
                log.warning("could not re-place %s of %s/%s: %s", rec.function, rec.env, rec.app, exc.message)
                self._unplaced.append(rec)
                self._retry_at = now + REPLACE_RETRY_S
                continue
            log.info("re-placed: %s", note)
            replaced.append(new)
        if self._prices_changed:
            self._prices_changed = False
            await self.rebalance()
        return replaced

    async def rebalance(self) -> list[tuple[str, str]]:
        """Move ``optimize="price"`` replicas to a pool that became cheaper by more than ``PRICE_HYSTERESIS``.

        The new replica starts first; the old one then gets ``StopReplica``, which drains its in-flight inputs
        before it exits, so no work is interrupted. Returns (old, new) replica ids.
        """
        self.rebalance_passes += 1
        moved: list[tuple[str, str]] = []
        releases: dict[tuple[str, str], Release | None] = {}
        for rec in list(self.replicas.values()):
            if rec.state != "running" or not rec.gpu_indices:
                continue
            if (rec.env, rec.app) not in releases:
                releases[(rec.env, rec.app)] = await self.store.active_release(rec.env, rec.app)
            release = releases[(rec.env, rec.app)]
            if release is None or release.release_id != rec.release_id:
                continue
            fn = next((f for f in release.spec.functions if f.name == rec.function), None)
            now = self.fleet.price_of(rec.agent_id, rec.gpu_indices[0])
            if fn is None or fn.job is not None or fn.optimize != "price" or now is None:
                continue
            runtime = self._runtime(release.spec.image)
            if runtime:  # the index does not track runtimes: judge the docker agents one by one
                live = await self.live_agents()
                best = domain.place(
                    request_of(fn, runtime), live, self.reservations(), self._released, prices=self.prices
                )
            else:
                best = self.fleet.choose(request_of(fn))
            if not best.placed or best.price >= now * (1 - PRICE_HYSTERESIS):
                continue
            url = await self.blobs.presign_get(release.bundle_key, BUNDLE_URL_TTL_S)
            try:
                new, note = await self._start_one(release, fn, url)
            except DuanFlowError as exc:
                log.warning("could not move %s to a cheaper pool: %s", rec.replica_id, exc.message)
                continue
            log.info("moved %s ($%.2f/GPU-h) for a cheaper pool: %s", rec.replica_id, now, note)
            await self._stop_all([rec])
            moved.append((rec.replica_id, new.replica_id))
        return moved

    def apply_price(self, update: PriceUpdate) -> int:
        """Use a live price from the next placement on; returns how many agents it re-priced."""
        touched = self.fleet.set_price(update)
        self._prices_changed = True
        log.info(
            "price of pool %s%s is now $%.4f/GPU-h (%d agent(s))",
            update.pool,
            f" ({update.gpu_type})" if update.gpu_type else "",
            update.price_per_gpu_hour,
            touched,
        )
        return touched

    async def set_price(self, update: PriceUpdate) -> PriceList:
        """``duanflow price set POOL PRICE``: validate, store in the prices bucket, announce on the price feed."""
        try:
            pool = subjects.token(update.pool)
        except ValueError as exc:
            raise InvalidInputError(f"invalid pool name: {exc}", details=details(pool=update.pool)) from None
        price = update.price_per_gpu_hour
        if not (0 <= price <= MAX_PRICE_PER_GPU_HOUR) or price != price:
            raise InvalidInputError(
                f"price must be dollars per GPU-hour from 0 to {MAX_PRICE_PER_GPU_HOUR:g}, got {price}",
                details=details(pool=pool, price=price),
            )
        clean = msgspec.structs.replace(
            update, pool=pool, gpu_type=norm_type(update.gpu_type), ts_ms=update.ts_ms or self._now_ms()
        )
        self.apply_price(clean)
        await self.platform.store_price(clean)
        await self.platform.publish_price(clean)
        return self.price_list()

    def price_list(self) -> PriceList:
        """Every live price override."""
        return PriceList(prices=self.prices.updates())

    def _reserve(self, rec: ReplicaRecord) -> None:
        self.replicas[rec.replica_id] = rec
        self.fleet.reserve(rec.agent_id, rec.gpu_indices)

    def _unreserve(self, replica_id: str, *, stopped: bool = False) -> ReplicaRecord | None:
        rec = self.replicas.pop(replica_id, None)
        if rec is not None:
            self.fleet.unreserve(rec.agent_id, rec.gpu_indices, replica_id if stopped else "")
        return rec

    def _runtime(self, image: ImageSpec) -> str:
        """The runtime a release's replicas need (:func:`domain.replica_runtime`; docker when this router has the
        builder's registry)."""
        return domain.replica_runtime(image, self.setup is not None and bool(self.setup.docker_registry))

    def _decide(
        self, fn: FunctionSpec, live: list[CapacityReport], env: str, app: str, image_id: str, runtime: str = ""
    ) -> domain.Placement:
        """Filter → score → tie-break: every agent judged on small fleets, the fleet index on large ones.

        A request for the docker runtime is always judged agent by agent: the index does not track runtimes.
        """
        req = request_of(fn, runtime)
        warm = {r.agent_id for r in self.replicas.values() if (r.env, r.app, r.function) == (env, app, fn.name)}
        cached = {a.agent_id for a in live if image_id and image_id in a.cached_images}
        if runtime or len(live) <= BRUTE_FORCE_MAX_AGENTS:
            return domain.place(
                req, live, self.reservations(), self._released, prices=self.prices, warm=warm, cached=cached
            )
        decision = self.fleet.choose(req, warm=warm, cached=cached)
        verdicts = [
            CandidateVerdict(agent_id="", gpu_type=v.gpu_type, accepted=v.accepted, reason=v.reason, score=v.price)
            for v in self.fleet.explain(req)
        ]
        return dataclasses.replace(decision, candidates=(*decision.candidates, *verdicts))

    def runs(self, replica_id: str, env: str, app: str, function: str) -> bool:
        """Whether ``replica_id`` is a live replica of this function, as this router knows it."""
        rec = self.replicas.get(replica_id)
        return rec is not None and (rec.env, rec.app, rec.function) == (env, app, function)

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

    async def payload_url(self, req: PayloadUrlRequest) -> PayloadUrlReply:
        """Where to PUT (``upload``) or GET one large argument or result; keys are content-addressed."""
        digest = req.digest.strip().lower()
        if not domain.is_digest(digest):
            raise InvalidInputError("payload digest must be 64 hex characters (sha256)", details=details(digest=digest))
        if req.size < 0 or req.size > PAYLOAD_MAX_BYTES:
            raise PayloadTooLargeError(
                f"a payload of {req.size} bytes is over the {PAYLOAD_MAX_BYTES} byte limit",
                details=details(size=req.size, limit=PAYLOAD_MAX_BYTES),
            )
        key = f"payloads/{digest[:2]}/{digest}"
        if req.upload:
            if await self.blobs.exists(key):
                return PayloadUrlReply(key=key, exists=True)
            return PayloadUrlReply(key=key, url=await self.blobs.presign_put(key, UPLOAD_URL_TTL_S))
        if not await self.blobs.exists(key):
            raise NotFoundError(f"no payload {digest}", details=details(digest=digest))
        return PayloadUrlReply(key=key, url=await self.blobs.presign_get(key, UPLOAD_URL_TTL_S), exists=True)

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

    async def stop_app(self, req: AppStopRequest) -> AppStopReply:
        """``duanflow stop APP``: no active release, no routes, its replicas drained and stopped."""
        if self.setup is None:
            raise UnavailableError("this router cannot stop apps (started without its replica setup)")
        lock = self._deploy_locks.setdefault((req.env, req.app), asyncio.Lock())
        async with lock:
            return await self.setup.stop_app(
                req,
                lambda env, app: self.store.running_replicas(env, app),
                self._stop_all,
                lambda env, app: self.platform.put_routes(env, app, {}),
            )

    async def fleet_view(self) -> FleetReply:
        """Every live agent with its latest report."""
        return FleetReply(agents=await self.live_agents())

    async def deploy(self, req: DeployRequest) -> DeployReply:
        """Store an immutable release, place its replicas, then activate it and stop the previous ones."""
        self._validate(req)
        if self.setup is not None:
            await self.setup.check(req)
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
            if (
                fn.endpoint is not None
                and fn.endpoint.auth_secret
                and domain.bearer_token_value(req.spec, fn) is None
                and not (self.setup is not None and (req.spec.secrets or fn.secrets))
            ):
                name = fn.endpoint.auth_secret
                raise InvalidInputError(
                    f"{fn.name} uses Auth.bearer({name!r}) but the app's env has no {name}: set it, e.g. "
                    f"df.App(..., env={{{name!r}: os.environ[{name!r}]}})",
                    details=details(function=fn.name),
                )
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
        runtime = self._runtime(spec.image)
        for fn in spec.functions:
            # Refuse what can never run (or cannot run until an agent with its runtime joins) before anything is stored.
            verdict = self._decide(fn, live, env, spec.name, req.image_id, runtime)
            if verdict.outcome == domain.OUTCOME_NO_RUNTIME:
                await self._announce(env, spec.name, "", fn.name, verdict)
                raise NoCapacityError(verdict.reason, details=details(function=fn.name, runtime=runtime))
            if verdict.outcome == domain.OUTCOME_NO_MATCHING_GPU:
                await self._announce(env, spec.name, "", fn.name, verdict)
                raise NoMatchingGpuError(
                    verdict.reason,
                    details=details(
                        function=fn.name, gpu=",".join(fn.gpu), gpu_count=fn.gpu_count, gpu_memory_mb=fn.gpu_memory_mb
                    ),
                )
        conflicts = domain.route_conflicts(env, spec, await self.platform.routes())
        if conflicts:
            raise ConflictError(
                "two endpoints cannot serve the same method and path: " + "; ".join(conflicts),
                details=details(app=spec.name, env=env),
            )
        stored = await self.setup.stored_release(self.store, req) if self.setup is not None else None
        release = stored or await self._create_release(req)
        for fn in spec.functions:
            await self.platform.ensure_function_consumer(env, spec.name, fn)
        bundle_url = await self.blobs.presign_get(req.bundle_key, BUNDLE_URL_TTL_S)
        started: list[ReplicaRecord] = []
        messages: list[str] = []
        old = [
            r
            for r in await self.store.running_replicas(env, spec.name)
            if r.release_id != release.release_id and r.replica_id not in self.job_replicas
        ]
        stopped_early = False
        try:
            for fn in spec.functions:
                # Jobs get one dedicated replica per run when submitted (jobs.py), none at deploy.
                for _ in range(0 if fn.job is not None else max(1, fn.keep_warm)):
                    try:
                        wait_s = 0.0 if old and not stopped_early else self._capacity_wait_s
                        rec, note = await self._start_one(release, fn, bundle_url, wait_s)
                    except NoCapacityError:
                        if stopped_early or not old:
                            raise
                        # The old release holds the capacity (a one-GPU host): replace in place instead of
                        # blue/green, accepting a gap in service over failing the deploy.
                        stopped_early = True
                        messages.append(f"no spare capacity: stopping {len(old)} old replica(s) before starting")
                        await self._stop_all(old)
                        rec, note = await self._start_one(release, fn, bundle_url, self._capacity_wait_s)
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
        routes = domain.route_entries(await self.setup.with_bearer_env(release) if self.setup else release)
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

    async def _start_one(
        self,
        release: Release,
        fn: FunctionSpec,
        bundle_url: str,
        wait_s: float = 0.0,
        *,
        job_id: str = "",
        on_reserved: Callable[[ReplicaRecord], None] | None = None,
    ) -> tuple[ReplicaRecord, str]:
        """Place and start one replica; ``on_reserved`` sees its record once its GPUs are reserved, before it starts.

        An agent that nothing answers for (it died; its capacity entry outlived it, as one stored by a router that
        has stopped since does for up to its liveness horizon) is dropped from the fleet at once, and the replica
        placed again on the others.
        """
        for _ in range(GONE_AGENT_RETRIES):
            try:
                return await self._place_and_start(
                    release, fn, bundle_url, wait_s, job_id=job_id, on_reserved=on_reserved
                )
            except AgentGoneError as exc:
                gone = exc.details.get("agent", "")
                log.warning("%s: placing the replica again without it", exc.message)
                await self._drop_agent(gone, self._now_ms())
        return await self._place_and_start(release, fn, bundle_url, wait_s, job_id=job_id, on_reserved=on_reserved)

    async def _place_and_start(
        self,
        release: Release,
        fn: FunctionSpec,
        bundle_url: str,
        wait_s: float,
        *,
        job_id: str,
        on_reserved: Callable[[ReplicaRecord], None] | None,
    ) -> tuple[ReplicaRecord, str]:
        env, app = release.env, release.app
        extras: ReplicaExtras | None = None
        fetched = self.setup is None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_s
        attempt = 0
        runtime = self._runtime(release.spec.image)
        while True:
            live = await self.live_agents()
            placement = self._decide(fn, live, env, app, release.image_id, runtime)
            if placement.placed and not fetched:
                # The replica's secrets and image URL are read only once it can be placed (a queued job costs no
                # lookup per tick), then the placement is decided again over the same reports and the reservations
                # as they are now: no await may come between a decision and its reservation, or two concurrent
                # placements (jobs, autoscaler, deploys) could take the same GPUs.
                assert self.setup is not None
                extras, fetched = await self.setup.for_replica(release, fn), True
                placement = self._decide(fn, live, env, app, release.image_id, runtime)
            if placement.placed:
                break
            await self._announce(env, app, release.release_id, fn.name, placement)
            if placement.outcome == domain.OUTCOME_NO_MATCHING_GPU:
                raise NoMatchingGpuError(placement.reason, details=details(function=fn.name))
            if placement.outcome == domain.OUTCOME_NO_RUNTIME:  # retryable, but not worth waiting for here
                raise NoCapacityError(
                    placement.reason, details=details(function=fn.name, release=release.release_id, runtime=runtime)
                )
            delay = CAPACITY_BACKOFF_S[min(attempt, len(CAPACITY_BACKOFF_S) - 1)]
            if loop.time() + delay > deadline:
                waited = f" after waiting {wait_s:.0f}s" if wait_s else ""
                raise NoCapacityError(
                    placement.reason + waited, details=details(function=fn.name, release=release.release_id)
                )
            log.info("no capacity for %s/%s.%s yet: retrying in %.1fs", env, app, fn.name, delay)
            attempt += 1
            await asyncio.sleep(delay)
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
        # Reserve before the first await, so a concurrent deploy's placement sees these GPUs as taken; the
        # reservation holds until the agent confirms the replica started, and is released if it does not.
        self._reserve(rec)
        if on_reserved is not None:
            on_reserved(rec)
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
            stream=subjects.STREAM_QUEUES if fn.queue else subjects.STREAM_INVOCATIONS,
            consumer=(
                subjects.job_consumer(job_id)
                if job_id
                else subjects.queue_consumer(env, fn.queue)
                if fn.queue
                else subjects.consumer_name(env, app, fn.name)
            ),
            concurrency=fn.concurrency,
            timeout_s=fn.timeout_s,
            gpu_indices=list(placement.gpu_indices),
            env_vars={
                **(extras.env_vars if extras is not None else _env_vars(release.spec, fn)),
                **({ENV_JOB_ID: job_id} if job_id else {}),
            },
            image_url=extras.image_url if extras is not None else "",
            secret_keys=extras.secret_keys if extras is not None else [],
            docker_image=extras.docker_image if extras is not None else "",
        )
        try:
            await self._announce(env, app, release.release_id, fn.name, placement, replica_id)
            await self.store.record_replica(rec)
            reply = await self.agents.start_replica(placement.agent_id, command, self._start_timeout_s)
        except Exception as exc:
            self._unreserve(replica_id)
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

    # ----------------------------------------------------------------- autoscaling (autoscale.py)

    def deploying(self, env: str, app: str) -> bool:
        """Whether a deploy or stop of the app is under way (the autoscaler leaves the app alone meanwhile)."""
        lock = self._deploy_locks.get((env, app))
        return lock is not None and lock.locked()

    async def start_replica(self, release: Release, fn: FunctionSpec) -> ReplicaRecord:
        """Place and start one more replica of ``fn`` now (NoCapacityError at once when nothing fits)."""
        url = await self.blobs.presign_get(release.bundle_key, BUNDLE_URL_TTL_S)
        rec, note = await self._start_one(release, fn, url)
        log.info("autoscaler: %s", note)
        return rec

    async def stop_replicas(self, replicas: list[ReplicaRecord]) -> None:
        """Drain and stop ``replicas`` (StopReplica lets in-flight inputs finish)."""
        await self._stop_all(replicas)

    async def announce(
        self, env: str, app: str, release_id: str, fn: str, placement: domain.Placement, replica_id: str = ""
    ) -> None:
        """Publish one decision as an event and a ``scheduler`` log line (see :meth:`_announce`)."""
        await self._announce(env, app, release_id, fn, placement, replica_id)

    async def _stop_all(self, replicas: list[ReplicaRecord], grace_s: float | None = None) -> None:
        for rec in replicas:
            stop = StopReplica(replica_id=rec.replica_id, **({} if grace_s is None else {"grace_s": grace_s}))
            try:
                await self.agents.stop_replica(rec.agent_id, stop)
            except Exception as exc:  # an unreachable agent must not fail the deploy that replaced it
                log.warning("could not stop replica %s on %s: %s", rec.replica_id, rec.agent_id, exc)
            self._unreserve(rec.replica_id, stopped=True)
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
            level="warning" if placement.outcome in WARNING_OUTCOMES else "info",
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

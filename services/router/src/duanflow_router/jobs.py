"""Long GPU jobs (``@app.job``): submit, list, status, cancel, and each job's one dedicated replica.

A submitted job is a row in ``jobs`` (Postgres) plus one invocation on its own subject
(``subjects.job_invocation``, stored by JetStream, so it survives a router restart) with its own durable consumer
(``subjects.job_consumer``). The leader places one replica per job (``ControlPlane._start_one`` with the job's
consumer and ``DUANFLOW_JOB_ID``: the runtime's one-shot mode), holding ``gpu_count`` GPUs on one host that no
other replica gets; no capacity → the job stays ``queued`` and every tick tries again, oldest first. The replica
reports ``running`` and how it ended on ``subjects.job_event(job_id)``; the router records it, stops the replica
and frees its GPUs. Cancel marks the job ``cancelled`` and stops its replica (SIGKILL after the grace). Backstops
on every tick: a result in the results bucket finishes a job whose event was lost; a job running past its timeout
plus grace is stopped as ``timed_out``; a job whose replica vanished (dead agent, app stopped) ``failed``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Final

import msgspec
from duanflow_kit.service import stop_tasks
from duanflow_proto import codec, subjects
from duanflow_proto.errors import (
    DuanFlowError,
    InvalidInputError,
    NoCapacityError,
    NoMatchingGpuError,
    NotFoundError,
    details,
)
from duanflow_proto.messages.invocation import Invocation, Result
from duanflow_proto.messages.jobs import (
    CANCELLED,
    FAILED,
    HDR_JOB,
    QUEUED,
    RUNNING,
    STATES,
    SUCCEEDED,
    TERMINAL,
    TIMED_OUT,
    JobEvent,
    JobInfo,
    JobList,
    JobListRequest,
    JobRef,
    JobSubmit,
)
from duanflow_proto.messages.logs import LogLine
from duanflow_proto.messages.release import FunctionSpec, Release
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import KeyNotFoundError
from nats.js.errors import NotFoundError as JsNotFoundError

from duanflow_router.control import BUNDLE_URL_TTL_S, ControlPlane
from duanflow_router.handlers import Route
from duanflow_router.ports import ReplicaRecord

log = logging.getLogger("duanflow.router.jobs")

JOB_ID: Final = re.compile(r"^jb-[0-9a-f]{8,32}$")
HDR_MSG_ID: Final = "Nats-Msg-Id"
ACK_WAIT_S: Final = 60.0
"""The job's input lease; its replica says ``in_progress`` every 10 s while it runs."""
STOP_MARGIN_S: Final = 30.0
"""A running job past ``timeout + grace + this`` (its replica never reported) is stopped as ``timed_out``."""
RECONCILE_EVERY_S: Final = 5.0
"""How often running jobs are checked against the results bucket and the placed replicas."""
MAX_LIST: Final = 1000

# --------------------------------------------------------------------------- the state machine (pure)

_NEXT: Final[dict[str, frozenset[str]]] = {
    QUEUED: frozenset({RUNNING, SUCCEEDED, FAILED, TIMED_OUT, CANCELLED}),
    RUNNING: frozenset({SUCCEEDED, FAILED, TIMED_OUT, CANCELLED}),
}


def can_move(current: str, new: str) -> bool:
    """Whether a job in ``current`` may go to ``new``: forward only, and never out of a final state.

    >>> can_move("queued", "running"), can_move("running", "queued"), can_move("succeeded", "failed")
    (True, False, False)
    """
    return new in _NEXT.get(current, frozenset())


def outcome_of(result: Result) -> str:
    """The final state a stored Result means."""
    if result.ok:
        return SUCCEEDED
    if result.error is not None and result.error.code == "function_timeout":
        return TIMED_OUT
    if result.error is not None and result.error.code == "cancelled":
        return CANCELLED
    return FAILED


def apply_event(job: JobInfo, event: JobEvent) -> JobInfo | None:
    """The job after one event from its replica; None when the event is stale, foreign or not a move."""
    if event.job_id != job.job_id or event.state not in STATES:
        return None
    if job.replica_id and event.replica_id != job.replica_id:
        return None
    if not can_move(job.state, event.state):
        return None
    changes: dict[str, Any] = {"state": event.state, "replica_id": job.replica_id or event.replica_id}
    ts = event.ts_ms or int(time.time() * 1000)
    if event.state == RUNNING:
        changes["started_ms"] = ts
        changes["message"] = ""
    else:
        changes["finished_ms"] = ts
        changes["started_ms"] = job.started_ms or ts
        changes["error"] = event.error
        changes["traceback"] = event.traceback
    return msgspec.structs.replace(job, **changes)


def overdue(job: JobInfo, grace_s: float, now_ms: int) -> bool:
    """A running job past its timeout, its grace and a margin: its replica did not stop it itself."""
    if job.state != RUNNING or not job.started_ms:
        return False
    return now_ms > job.started_ms + int((job.timeout_s + grace_s + STOP_MARGIN_S) * 1000)


# --------------------------------------------------------------------------- storage

_COLS: Final = (
    "job_id, env, app, function, release_id, state, replica_id, agent_id, gpu_indices, gpu_type, timeout_s, "
    "grace_s, created_ms, started_ms, finished_ms, error, traceback, message"
)


@dataclass
class JobRow:
    """A job as stored: its public :class:`JobInfo` and the grace its replica gets when stopped."""

    info: JobInfo
    grace_s: float = 30.0


def _row(r: Any) -> JobRow:
    info = JobInfo(
        job_id=r["job_id"],
        env=r["env"],
        app=r["app"],
        function=r["function"],
        release_id=r["release_id"],
        state=r["state"],
        replica_id=r["replica_id"],
        agent_id=r["agent_id"],
        gpu_indices=list(r["gpu_indices"]),
        gpu_type=r["gpu_type"],
        timeout_s=float(r["timeout_s"]),
        created_ms=int(r["created_ms"]),
        started_ms=int(r["started_ms"]),
        finished_ms=int(r["finished_ms"]),
        error=r["error"],
        traceback=r["traceback"],
        message=r["message"],
    )
    return JobRow(info=info, grace_s=float(r["grace_s"]))


class PostgresJobStore:
    """The ``jobs`` table in the router's schema (asyncpg pool, search_path set)."""

    def __init__(self, pool: Any) -> None:
        self.pool = pool

    async def insert(self, row: JobRow) -> bool:
        """Store a new job; False when its id exists already."""
        j = row.info
        got = await self.pool.fetchval(
            f"INSERT INTO jobs ({_COLS}) VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11,$12,$13,$14,$15,$16,$17,$18) "  # noqa: S608
            "ON CONFLICT (job_id) DO NOTHING RETURNING job_id",
            *_values(row),
        )
        return got is not None and j.job_id == got

    async def save(self, row: JobRow) -> None:
        """Overwrite one job."""
        sets = ", ".join(f"{c} = ${i + 1}" for i, c in enumerate(_COLS.split(", ")))
        await self.pool.execute(f"UPDATE jobs SET {sets} WHERE job_id = $1", *_values(row))  # noqa: S608

    async def get(self, job_id: str) -> JobRow | None:
        """One job, if it exists."""
        r = await self.pool.fetchrow(f"SELECT {_COLS} FROM jobs WHERE job_id = $1", job_id)  # noqa: S608
        return _row(r) if r else None

    async def list_jobs(self, env: str, app: str, state: str, limit: int) -> list[JobRow]:
        """Jobs of one env (one app, one state when given), newest first."""
        rows = await self.pool.fetch(
            f"SELECT {_COLS} FROM jobs WHERE env = $1 AND ($2 = '' OR app = $2) AND ($3 = '' OR state = $3) "  # noqa: S608
            "ORDER BY created_ms DESC LIMIT $4",
            env,
            app,
            state,
            limit,
        )
        return [_row(r) for r in rows]

    async def live(self) -> list[JobRow]:
        """Queued and running jobs, oldest first."""
        rows = await self.pool.fetch(
            f"SELECT {_COLS} FROM jobs WHERE state IN ('queued', 'running') ORDER BY created_ms"  # noqa: S608
        )
        return [_row(r) for r in rows]


def _values(row: JobRow) -> list[Any]:
    j = row.info
    return [
        j.job_id,
        j.env,
        j.app,
        j.function,
        j.release_id,
        j.state,
        j.replica_id,
        j.agent_id,
        list(j.gpu_indices),
        j.gpu_type,
        j.timeout_s,
        row.grace_s,
        j.created_ms,
        j.started_ms,
        j.finished_ms,
        j.error,
        j.traceback,
        j.message,
    ]


def job_consumer_config(env: str, app: str, fn: str, job_id: str) -> ConsumerConfig:
    """The durable consumer holding one job's one invocation (its replica pulls it)."""
    return ConsumerConfig(
        durable_name=subjects.job_consumer(job_id),
        filter_subject=subjects.job_invocation(env, app, fn, job_id),
        ack_policy=AckPolicy.EXPLICIT,
        deliver_policy=DeliverPolicy.ALL,
        ack_wait=ACK_WAIT_S,
        max_deliver=3,
        max_ack_pending=1,
    )


# --------------------------------------------------------------------------- use cases


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass
class Jobs:
    """The job use cases on the control plane (placement, GPUs) and the router's JetStream connection."""

    control: ControlPlane
    store: PostgresJobStore
    js: Any
    _placing: set[str] = field(default_factory=set)
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)
    _locks: dict[str, asyncio.Lock] = field(default_factory=dict)
    _reconciled_at: float = 0.0
    _gate: asyncio.Lock = field(default_factory=asyncio.Lock)
    """Held from a placement's start until its GPUs are reserved: jobs take GPUs one at a time, in the order
    their placements began (oldest first), never both the same ones."""
    _reserved: dict[str, ReplicaRecord] = field(default_factory=dict)
    """Job → the replica reserved for it while it is being started (its events may come before the start ends)."""

    # -- API

    async def submit(self, req: JobSubmit) -> JobInfo:
        """Record the job, store its invocation, and try to place its replica (it stays queued otherwise)."""
        try:
            env, app, fn_name = subjects.token(req.env), subjects.token(req.app), subjects.token(req.function)
        except ValueError as exc:
            raise InvalidInputError(f"invalid job target: {exc}") from None
        job_id = req.job_id or f"jb-{_random_hex()}"
        if not JOB_ID.match(job_id):
            raise InvalidInputError(
                f"job id {job_id!r} must look like 'jb-' + 8 to 32 hex digits (or be empty: the router picks one)"
            )
        if not req.args and not req.payload_ref:
            raise InvalidInputError("a job submit carries its arguments (cloudpickle of (args, kwargs))")
        existing = await self.store.get(job_id)
        if existing is not None:  # a re-sent submit
            return existing.info
        release = await self.control.store.active_release(env, app)
        fn = _function(release, fn_name) if release is not None else None
        if release is None or fn is None:
            raise NotFoundError(
                f"{app}.{fn_name} is not deployed in env {env!r}: run `duanflow deploy` on its file first",
                details=details(app=app, function=fn_name, env=env),
            )
        if fn.job is None:
            raise InvalidInputError(
                f"{app}.{fn_name} is not an @app.job: call it with .remote() or .spawn() as a function",
                details=details(app=app, function=fn_name),
            )
        info = JobInfo(
            job_id=job_id,
            env=env,
            app=app,
            function=fn_name,
            release_id=release.release_id,
            state=QUEUED,
            timeout_s=fn.timeout_s,
            created_ms=_now_ms(),
        )
        row = JobRow(info=info, grace_s=fn.job.grace_s)
        if not await self.store.insert(row):
            got = await self.store.get(job_id)
            if got is not None:
                return got.info
        await self.js.add_consumer(subjects.STREAM_INVOCATIONS, job_consumer_config(env, app, fn_name, job_id))
        inv = Invocation(
            call_id=job_id,
            function=fn_name,
            args=req.args,
            payload_ref=req.payload_ref,
            python=req.python,
            keep_result=True,
        )
        await self.js.publish(
            subjects.job_invocation(env, app, fn_name, job_id),
            codec.encode(inv),
            headers={HDR_MSG_ID: job_id, HDR_JOB: job_id},
        )
        await self._log(info, f"job {job_id} of {app}.{fn_name} queued ({fn.gpu_count} x {'/'.join(fn.gpu) or 'CPU'})")
        self._start_placing(job_id)
        return info

    async def status(self, req: JobRef) -> JobInfo:
        """One job by id."""
        return (await self._get(req.job_id)).info

    async def list_jobs(self, req: JobListRequest) -> JobList:
        """Jobs newest first."""
        try:
            env = subjects.token(req.env)
            app = subjects.token(req.app) if req.app else ""
        except ValueError as exc:
            raise InvalidInputError(f"invalid env or app: {exc}") from None
        if req.state and req.state not in STATES:
            raise InvalidInputError(f"state {req.state!r} is not a job state; valid: {', '.join(STATES)}")
        limit = max(1, min(req.limit or 100, MAX_LIST))
        return JobList(jobs=[r.info for r in await self.store.list_jobs(env, app, req.state, limit)])

    async def cancel(self, req: JobRef) -> JobInfo:
        """Mark the job cancelled, then stop its replica (SIGKILL after the grace) and free its GPUs."""
        async with self._lock(req.job_id):
            row = await self._get(req.job_id)
            job = row.info
            if job.state in TERMINAL:
                return job
            job = msgspec.structs.replace(job, state=CANCELLED, finished_ms=_now_ms(), error="cancelled by request")
            row.info = job
            await self.store.save(row)
        await self._log(job, f"job {job.job_id} cancelled")
        self._spawn(self._release(row, grace_s=row.grace_s))
        return job

    # -- events and ticks

    async def on_event(self, event: JobEvent) -> None:
        """A job replica's report: record the move, and free the job's replica when it ended."""
        async with self._lock(event.job_id):
            row = await self.store.get(event.job_id)
            if row is None:
                log.warning("event for unknown job %s ignored", event.job_id)
                return
            moved = apply_event(_with_placement(row.info, self._reserved.get(event.job_id), self._gpu_type), event)
            if moved is None:
                return
            row.info = moved
            await self.store.save(row)
        await self._log(moved, f"job {moved.job_id} {moved.state}" + (f": {moved.error}" if moved.error else ""))
        if moved.state in TERMINAL and moved.job_id not in self._placing:
            self._spawn(self._release(row, grace_s=row.grace_s))

    async def load(self) -> None:
        """After taking the lease: the replicas of running jobs are job replicas (deploys leave them alone)."""
        for row in await self.store.live():
            if row.info.replica_id:
                self.control.job_replicas.add(row.info.replica_id)

    async def tick(self) -> None:
        """Place queued jobs (oldest first); every few seconds, reconcile running ones."""
        rows = await self.store.live()
        for row in rows:
            if row.info.state == QUEUED and row.info.job_id not in self._placing and not row.info.replica_id:
                self._start_placing(row.info.job_id)
        now = time.monotonic()
        if now - self._reconciled_at < RECONCILE_EVERY_S:
            return
        self._reconciled_at = now
        for row in rows:
            if row.info.state == RUNNING or (row.info.state == QUEUED and row.info.replica_id):
                await self._reconcile(row)

    async def stop(self) -> None:
        """Cancel background placements (the leader is stepping down)."""
        await stop_tasks(*self._tasks)

    # -- internals

    def _lock(self, job_id: str) -> asyncio.Lock:
        lock = self._locks.get(job_id)
        if lock is None:
            lock = self._locks[job_id] = asyncio.Lock()
            if len(self._locks) > 10_000:
                for key in [k for k, v in self._locks.items() if not v.locked()][:5000]:
                    del self._locks[key]
        return lock

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _start_placing(self, job_id: str) -> None:
        if job_id in self._placing:  # a tick may have started it between the submit's insert and here
            return
        self._placing.add(job_id)
        self._spawn(self._place(job_id))

    async def _get(self, job_id: str) -> JobRow:
        if not isinstance(job_id, str) or not JOB_ID.match(job_id):
            raise InvalidInputError(f"{job_id!r} is not a job id (they look like 'jb-0123abcd…')")
        row = await self.store.get(job_id)
        if row is None:
            raise NotFoundError(f"no job {job_id}: `duanflow jobs list` shows the jobs", details=details(job=job_id))
        return row

    async def _place(self, job_id: str) -> None:
        gated = False

        def reserved(rec: ReplicaRecord) -> None:
            nonlocal gated
            self._reserved[job_id] = rec
            if gated:
                gated = False
                self._gate.release()

        try:
            await self._gate.acquire()
            gated = True
            await self._place_once(job_id, reserved)
        except Exception as exc:
            log.warning("placing job %s: %s: %s", job_id, type(exc).__name__, exc)
        finally:
            if gated:
                self._gate.release()
            self._reserved.pop(job_id, None)
            self._placing.discard(job_id)

    async def _place_once(self, job_id: str, reserved: Callable[[ReplicaRecord], None]) -> None:
        row = await self.store.get(job_id)
        if row is None or row.info.state != QUEUED or row.info.replica_id:
            return
        job = row.info
        release = next(
            (r for r in await self.control.store.list_releases(job.env, job.app) if r.release_id == job.release_id),
            None,
        )
        fn = _function(release, job.function) if release is not None else None
        if release is None or fn is None:
            await self._finish(row, FAILED, f"release {job.release_id} of {job.app} no longer has {job.function}")
            return
        try:
            url = await self.control.blobs.presign_get(release.bundle_key, BUNDLE_URL_TTL_S)
            rec, note = await self.control._start_one(release, fn, url, job_id=job_id, on_reserved=reserved)
        except NoMatchingGpuError as exc:
            await self._finish(row, FAILED, exc.message)
            return
        except NoCapacityError as exc:
            await self._note(job_id, f"waiting for GPUs: {exc.message}")
            return
        except DuanFlowError as exc:  # the agent refused or timed out: try again next tick
            await self._note(job_id, f"replica did not start (retrying): {exc.message}")
            return
        self.control.job_replicas.add(rec.replica_id)
        log.info("job %s: %s", job_id, note)
        gpu_type = self._gpu_type(rec)
        async with self._lock(job_id):
            row = await self.store.get(job_id) or row
            placed = msgspec.structs.replace(
                row.info,
                replica_id=row.info.replica_id or rec.replica_id,
                agent_id=rec.agent_id,
                gpu_indices=list(rec.gpu_indices),
                gpu_type=gpu_type,
                message=note,
            )
            row.info = placed
            await self.store.save(row)
        if placed.state in TERMINAL:  # cancelled, or already done, while it was being placed
            await self._release(row, grace_s=row.grace_s)

    def _gpu_type(self, rec: ReplicaRecord) -> str:
        for report in self.control.fleet.reports():
            if report.agent_id == rec.agent_id:
                types = {g.gpu_type for g in report.gpus if g.index in rec.gpu_indices}
                return "/".join(sorted(types))
        return ""

    async def _note(self, job_id: str, message: str) -> None:
        async with self._lock(job_id):
            row = await self.store.get(job_id)
            if row is not None and row.info.message != message:
                row.info = msgspec.structs.replace(row.info, message=message)
                await self.store.save(row)

    async def _finish(self, row: JobRow, state: str, error: str, tb: str = "") -> JobInfo:
        """Move a job to a final state (when it may) and free its replica."""
        async with self._lock(row.info.job_id):
            fresh = await self.store.get(row.info.job_id) or row
            if not can_move(fresh.info.state, state):
                return fresh.info
            now = _now_ms()
            fresh.info = msgspec.structs.replace(
                fresh.info,
                state=state,
                finished_ms=now,
                started_ms=fresh.info.started_ms or (now if state != CANCELLED else 0),
                error=error,
                traceback=tb,
            )
            await self.store.save(fresh)
        await self._log(fresh.info, f"job {fresh.info.job_id} {state}" + (f": {error}" if error else ""))
        await self._release(fresh, grace_s=fresh.grace_s)
        return fresh.info

    async def _reconcile(self, row: JobRow) -> None:
        job = row.info
        result = await self._stored_result(job.job_id)
        if result is not None:
            err = result.error
            await self._finish(
                row, outcome_of(result), err.message if err else "", (err.traceback or "") if err else ""
            )
            return
        if overdue(job, row.grace_s, _now_ms()):
            await self._finish(row, TIMED_OUT, f"ran past its timeout of {job.timeout_s:g}s; stopped by the router")
            return
        if job.replica_id and job.replica_id not in self.control.replicas and job.job_id not in self._placing:
            await self._finish(row, FAILED, f"its replica {job.replica_id} on {job.agent_id} is gone (agent lost?)")

    async def _stored_result(self, job_id: str) -> Result | None:
        try:
            kv = await self.js.key_value(subjects.KV_RESULTS)
            entry = await kv.get(job_id)
        except KeyNotFoundError:
            return None
        except Exception as exc:
            log.debug("results bucket read for %s: %s", job_id, exc)
            return None
        if entry is None or not entry.value:
            return None
        try:
            return codec.decode(bytes(entry.value), Result)
        except DuanFlowError:
            return None

    async def _release(self, row: JobRow, *, grace_s: float) -> None:
        """Stop the job's replica (it may have exited already), free its GPUs, drop its input and consumer."""
        job = row.info
        rec = self.control.replicas.get(job.replica_id) if job.replica_id else None
        if rec is not None:
            await self._stop(rec, grace_s)
        self.control.job_replicas.discard(job.replica_id)
        with contextlib.suppress(JsNotFoundError, Exception):
            await self.js.delete_consumer(subjects.STREAM_INVOCATIONS, subjects.job_consumer(job.job_id))
        with contextlib.suppress(Exception):
            await self.js.purge_stream(
                subjects.STREAM_INVOCATIONS, subject=subjects.job_invocation(job.env, job.app, job.function, job.job_id)
            )

    async def _stop(self, rec: ReplicaRecord, grace_s: float) -> None:
        await self.control._stop_all([rec], grace_s=grace_s)

    async def _log(self, job: JobInfo, message: str) -> None:
        line = LogLine(
            ts_ms=_now_ms(),
            env=job.env,
            app=job.app,
            kind="scheduler",
            source="router",
            message=message,
            level="warning" if job.state in (FAILED, TIMED_OUT) else "info",
            release=job.release_id,
            function=job.function,
            replica=job.replica_id,
        )
        log.info("%s", message)
        with contextlib.suppress(Exception):
            await self.control.platform.publish_log(line)


def _with_placement(job: JobInfo, rec: ReplicaRecord | None, gpu_type: Callable[[ReplicaRecord], str]) -> JobInfo:
    """The job with the replica, agent and GPUs reserved for it (unchanged when none is, or another replica runs it)."""
    if rec is None or (job.replica_id and job.replica_id != rec.replica_id):
        return job
    return msgspec.structs.replace(
        job,
        replica_id=rec.replica_id,
        agent_id=rec.agent_id,
        gpu_indices=list(rec.gpu_indices),
        gpu_type=job.gpu_type or gpu_type(rec),
    )


def _function(release: Release, name: str) -> FunctionSpec | None:
    return next((f for f in release.spec.functions if f.name == name), None)


def _random_hex() -> str:
    import secrets

    return secrets.token_hex(8)


# --------------------------------------------------------------------------- transport


def routes(jobs: Any) -> list[Route]:
    """``API_JOB_*``; ``jobs`` returns the :class:`Jobs` of the running router."""
    return [
        Route(subjects.API_JOB_SUBMIT, JobSubmit, lambda r: jobs().submit(r), concurrent=True),
        Route(subjects.API_JOB_LIST, JobListRequest, lambda r: jobs().list_jobs(r)),
        Route(subjects.API_JOB_STATUS, JobRef, lambda r: jobs().status(r)),
        Route(subjects.API_JOB_CANCEL, JobRef, lambda r: jobs().cancel(r), concurrent=True),
    ]


class JobEventListener:
    """Core subscriber to every job's events (they are on the events stream too); only the leader applies them."""

    def __init__(self, jobs: Jobs, leading: Any) -> None:
        self.jobs = jobs
        self.leading = leading

    async def on_message(self, msg: Msg) -> None:
        """Decode one ``JobEvent`` (its subject must name its job) and apply it."""
        if not self.leading():
            return
        try:
            event = codec.decode(msg.data, JobEvent)
            if subjects.job_event(event.job_id) != msg.subject:
                raise InvalidInputError(f"job event for {event.job_id!r} on {msg.subject}")
        except (InvalidInputError, ValueError) as exc:
            log.warning("dropping job event on %s: %s", msg.subject, exc)
            return
        try:
            await self.jobs.on_event(event)
        except Exception as exc:  # the tick's reconcile catches up from the results bucket
            log.warning("could not apply job event %s %s: %s", event.job_id, event.state, exc)


def job_ids(rows: Iterable[JobRow]) -> list[str]:
    """Ids of ``rows`` (for logs and tests)."""
    return [r.info.job_id for r in rows]

"""Autoscaling: scale from zero on the first input, up on backlog to ``scale_to``, down to ``keep_warm`` when idle.

The rules are pure (:func:`desired_replicas`, :func:`plan`, :class:`IdleClock`); :class:`Autoscaler` does the I/O
through ports and runs on the leader only.

- **Scale from zero.** While a function of an active release (or a worker) has no replica, the leader holds a core
  NATS subscription on its input subject (JetStream publishes are ordinary publishes, so a core subscriber sees
  them) and starts a replica on the first message, then drops the subscription. The watch is set up before the
  pass reads the consumer, so an input published before the subscription shows in that read's ``num_pending``.
- **Backlog.** ``desired = clamp(ceil((num_pending + num_ack_pending) / concurrency), keep_warm, scale_to)``;
  missing replicas start in the background (bounded per pass), never past ``scale_to``. ``no_capacity`` is a
  scheduler decision and the function waits ``RETRY_S`` before the next try.
- **Idle.** Replicas above ``keep_warm`` stop (``StopReplica`` drains in-flight inputs) once the consumer's
  delivered sequence has not moved and nothing is in flight for ``idle_window_s``; to zero when ``keep_warm`` is 0.
- **Direct calls.** An endpoint's warm replicas also take the gateway's calls on a core subject, outside the
  consumer; they report that path's load (``ReplicaLoad``: calls running, calls taken so far) and
  :class:`DirectLoads` adds it to the consumer's read: running calls to ``ack_pending``, calls taken to
  ``delivered``. A call no replica can take goes to the stream, so a backlog always shows as ``num_pending``.

Every decision is a :class:`~duanflow_proto.messages.scheduler.SchedulerDecision` (outcome ``scale_up`` /
``scale_down``) and a ``scheduler`` log line. Jobs (``FunctionSpec.job``) and their replicas are never touched.

Cost: a pass issues one JetStream consumer-info request per function that could change (a round trip of ~0.2 ms
to the server, issued ``CONCURRENT_READS`` at a time) plus one Postgres query listing the active release ids
(specs are decoded only when a release changes). Functions where no decision is possible (at ``scale_to`` and
``keep_warm`` at once) are not read; functions at zero rely on their watch and are re-read every ``ZERO_RESCAN_S``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from duanflow_kit.service import stop_tasks
from duanflow_proto.errors import DuanFlowError, NoCapacityError
from duanflow_proto.messages.invocation import LOAD_REPORT_S, ReplicaLoad
from duanflow_proto.messages.release import FunctionSpec, Release

from duanflow_router import domain
from duanflow_router.control import ControlPlane
from duanflow_router.placement import Placement
from duanflow_router.ports import ActiveReleases, ConsumerLoad, Platform, ReplicaRecord, Unwatch, Wakeups

log = logging.getLogger("duanflow.router.autoscale")

OUTCOME_SCALE_UP = "scale_up"
OUTCOME_SCALE_DOWN = "scale_down"
REASON_FROM_ZERO = "scale from zero"
RETRY_S = 5.0
"""After ``no_capacity`` (or a failed start) a function waits this long before the autoscaler tries again."""
ZERO_RESCAN_S = 5.0
"""A function at zero with a live watch has its consumer re-read at most this often (the safety net)."""
CONCURRENT_READS = 32

Key = tuple[str, str, str]
"""(env, app, function)."""


# --------------------------------------------------------------------------- pure rules


def desired_replicas(backlog: int, concurrency: int, keep_warm: int, scale_to: int) -> int:
    """Replicas wanted for ``backlog`` inputs (waiting + in flight): ``ceil(backlog / concurrency)`` clamped.

    The ceiling is ``scale_to`` (never below ``keep_warm`` or 1); the floor is ``keep_warm``.

    >>> desired_replicas(0, 1, 0, 3), desired_replicas(1, 4, 0, 3), desired_replicas(9, 2, 0, 3)
    (0, 1, 3)
    >>> desired_replicas(0, 1, 2, 5), desired_replicas(7, 2, 1, 5)
    (2, 4)
    """
    upper = max(1, scale_to, keep_warm)
    want = math.ceil(max(0, backlog) / max(1, concurrency))
    return max(keep_warm, min(want, upper))


@dataclass(frozen=True, slots=True)
class Plan:
    """What one pass does for one function: start or stop some replicas, and why."""

    start: int = 0
    stop: int = 0
    reason: str = ""


def plan(
    *,
    running: int,
    load: ConsumerLoad,
    keep_warm: int,
    scale_to: int,
    concurrency: int,
    idle_s: float,
    idle_window_s: float,
    max_starts: int,
) -> Plan:
    """The decision for one function with ``running`` replicas (starting ones included).

    >>> load = ConsumerLoad(pending=1, ack_pending=0, delivered=0)
    >>> plan(running=0, load=load, keep_warm=0, scale_to=3, concurrency=1, idle_s=0, idle_window_s=60, max_starts=8)
    Plan(start=1, stop=0, reason='scale from zero')
    """
    backlog = load.pending + load.ack_pending
    desired = desired_replicas(backlog, concurrency, keep_warm, scale_to)
    if desired > running:
        n = min(desired - running, max(0, max_starts))
        if n == 0:
            return Plan()
        if running == 0 and backlog:
            reason = REASON_FROM_ZERO
        elif backlog:
            reason = f"backlog {backlog}"
        else:
            reason = f"keep_warm {keep_warm}"
        return Plan(start=n, reason=reason)
    if running > keep_warm and backlog == 0 and idle_s >= idle_window_s:
        return Plan(stop=running - keep_warm, reason=f"idle for {idle_s:.0f}s")
    return Plan()


@dataclass
class IdleClock:
    """How long a consumer has gone without a new delivery and with nothing in flight."""

    delivered: int = -1
    since: float = 0.0

    def observe(self, load: ConsumerLoad, now: float) -> float:
        """Seconds idle as of ``now`` (0 when something was delivered since the last read or is in flight)."""
        if load.delivered != self.delivered or load.ack_pending or load.pending:
            self.delivered = load.delivered
            self.since = now
            return 0.0
        return now - self.since

    def touch(self, now: float) -> None:
        """Restart the window (replicas were just started: give them one)."""
        self.since = now


DIRECT_LOAD_TTL_S = 3 * LOAD_REPORT_S
"""A replica's direct-path report counts this long (a replica reports every ``LOAD_REPORT_S`` while in use)."""


class DirectLoads:
    """The latest ``ReplicaLoad`` of each replica, summed per function for the autoscaler."""

    def __init__(self, ttl_s: float = DIRECT_LOAD_TTL_S) -> None:
        self.ttl_s = ttl_s
        self._by_fn: dict[Key, dict[str, tuple[int, int, float]]] = {}

    def observe(self, load: ReplicaLoad, now: float) -> None:
        """Record one report received at ``now``."""
        key = (load.env, load.app, load.function)
        self._by_fn.setdefault(key, {})[load.replica_id] = (max(0, load.busy), max(0, load.served), now)

    def totals(self, key: Key, now: float) -> tuple[int, int]:
        """``(running, taken)`` direct calls of ``key`` over the replicas heard from within the TTL.

        >>> d = DirectLoads(ttl_s=3)
        >>> d.observe(ReplicaLoad(replica_id="r1", env="e", app="a", function="f", busy=2, served=10), 0)
        >>> d.observe(ReplicaLoad(replica_id="r2", env="e", app="a", function="f", busy=1, served=5), 1)
        >>> d.totals(("e", "a", "f"), 2), d.totals(("e", "a", "f"), 3.5), d.totals(("e", "a", "g"), 0)
        ((3, 15), (1, 5), (0, 0))
        """
        replicas = self._by_fn.get(key)
        if not replicas:
            return 0, 0
        busy = served = 0
        for replica, (b, n, at) in list(replicas.items()):
            if now - at > self.ttl_s:
                del replicas[replica]
                continue
            busy += b
            served += n
        if not replicas:
            del self._by_fn[key]
        return busy, served

    def add_to(self, key: Key, load: ConsumerLoad, now: float) -> ConsumerLoad:
        """``load`` (one read of the consumer) with the direct path's load of ``key`` added."""
        busy, served = self.totals(key, now)
        if not busy and not served:
            return load
        return ConsumerLoad(
            pending=load.pending, ack_pending=load.ack_pending + busy, delivered=load.delivered + served
        )


def is_job(fn: FunctionSpec) -> bool:
    """Whether ``fn`` is an ``@app.job`` (its replica is placed per job, never scaled here)."""
    return getattr(fn, "job", None) is not None or fn.kind == "job"


def is_job_replica(rec: ReplicaRecord) -> bool:
    """Whether ``rec`` runs a job (never stopped by the autoscaler)."""
    return bool(getattr(rec, "job_id", None) or getattr(rec, "job", None))


# --------------------------------------------------------------------------- the loop


@dataclass
class _Fn:
    """What the autoscaler keeps per function."""

    release: Release
    spec: FunctionSpec
    idle: IdleClock = field(default_factory=IdleClock)
    starting: int = 0
    """Starts launched and not finished."""
    retry_at: float = 0.0
    watch: Unwatch | None = None
    watching: bool = False
    """A watch is set up or being set up."""
    read_at: float = -math.inf
    """When its consumer was last read."""


class Autoscaler:
    """Runs :func:`plan` for every function of the active releases, on the leader, every ``interval_s``."""

    def __init__(
        self,
        control: ControlPlane,
        releases: ActiveReleases,
        platform: Platform,
        wakeups: Wakeups | None,
        *,
        interval_s: float = 0.5,
        idle_window_s: float = 60.0,
        max_starts: int = 8,
        clock: Callable[[], float] = time.monotonic,
        direct: DirectLoads | None = None,
    ) -> None:
        self.control = control
        self.releases = releases
        self.platform = platform
        self.wakeups = wakeups
        self.interval_s = interval_s
        self.idle_window_s = idle_window_s
        self.max_starts = max_starts
        self.clock = clock
        self.direct = direct if direct is not None else DirectLoads()
        """Endpoint replicas' direct-path reports (fed by the router's listener, read with ``clock``'s times)."""
        self.fns: dict[Key, _Fn] = {}
        self._specs: dict[tuple[str, str], tuple[str, Release | None]] = {}
        self._stopping: set[str] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self.passes = 0

    # ----------------------------------------------------------------- lifecycle

    async def run(self, leading: Callable[[], bool]) -> None:
        """Scale while ``leading()``; stand by (no watches) otherwise. Errors end a pass, never the loop."""
        try:
            while True:
                await asyncio.sleep(self.interval_s)
                if not leading():
                    await self.standby()
                    continue
                try:
                    await self.step()
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # a NATS or Postgres hiccup: next pass
                    log.warning("autoscaler pass: %s: %s", type(exc).__name__, exc)
        finally:
            await self.close()

    async def standby(self) -> None:
        """Drop every watch and forget the functions (a new leader rebuilds them)."""
        for key in list(self.fns):
            await self._unwatch(self.fns[key])
        self.fns.clear()

    async def close(self) -> None:
        """Stop: drop watches, cancel starts and stops under way."""
        await stop_tasks(*self._tasks)
        with contextlib.suppress(Exception):
            await self.standby()

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ----------------------------------------------------------------- one pass

    async def _targets(self) -> dict[Key, tuple[Release, FunctionSpec]]:
        ids = await self.releases.active_release_ids()
        specs: dict[tuple[str, str], tuple[str, Release | None]] = {}
        for env, app, release_id in ids:
            held = self._specs.get((env, app))
            if held is None or held[0] != release_id:
                held = (release_id, await self.control.store.active_release(env, app))
            specs[(env, app)] = held
        self._specs = specs
        out: dict[Key, tuple[Release, FunctionSpec]] = {}
        for (env, app), (_, release) in specs.items():
            if release is None:
                continue
            for fn in release.spec.functions:
                if not is_job(fn):
                    out[(env, app, fn.name)] = (release, fn)
        return out

    def _replicas(self, key: Key, release_id: str) -> list[ReplicaRecord]:
        env, app, name = key
        jobs: set[str] = getattr(self.control, "job_replicas", set())  # job replicas belong to jobs.py
        return [
            r
            for r in self.control.replicas.values()
            if r.function == name
            and r.app == app
            and r.env == env
            and r.release_id == release_id
            and r.replica_id not in self._stopping
            and not is_job_replica(r)
            and r.replica_id not in jobs
        ]

    def running(self, key: Key) -> int:
        """Replicas of the function counted by the autoscaler: placed ones plus starts it launched."""
        st = self.fns.get(key)
        if st is None:
            return 0
        recs = self._replicas(key, st.release.release_id)
        placed = len(recs)
        confirmed = sum(1 for r in recs if r.state == "running")
        return max(placed, confirmed + st.starting)

    async def step(self) -> None:
        """One pass over every function of the active releases."""
        self.passes += 1
        now = self.clock()
        targets = await self._targets()
        for key in [k for k in self.fns if k not in targets]:
            await self._unwatch(self.fns.pop(key))
        todo: list[tuple[Key, _Fn, int]] = []
        for key, (release, spec) in targets.items():
            st = self.fns.get(key)
            if st is None or st.release.release_id != release.release_id:
                if st is not None:
                    await self._unwatch(st)
                st = self.fns[key] = _Fn(release, spec, starting=st.starting if st is not None else 0)
            if self.control.deploying(key[0], key[1]) or now < st.retry_at:
                continue
            running = self.running(key)
            if running == 0 and st.starting == 0:
                if not st.watching:
                    await self._watch(key, st)
                elif now - st.read_at < ZERO_RESCAN_S:
                    continue  # the watch wakes it
            else:
                await self._unwatch(st)
            upper = max(1, spec.scale_to, spec.keep_warm)
            if running >= upper and running <= spec.keep_warm:
                continue  # nothing could change: no read
            todo.append((key, st, running))
        loads = await self._loads(todo, now)
        budget = self.max_starts
        for (key, st, running), load in zip(todo, loads, strict=True):
            if load is None or self.control.deploying(key[0], key[1]):
                continue  # a deploy began while the loads were read: it owns the app's replicas now
            load = self.direct.add_to(key, load, now)
            idle_s = st.idle.observe(load, now)
            decision = plan(
                running=running,
                load=load,
                keep_warm=st.spec.keep_warm,
                scale_to=st.spec.scale_to,
                concurrency=st.spec.concurrency,
                idle_s=idle_s,
                idle_window_s=self.idle_window_s,
                max_starts=budget,
            )
            if decision.start:
                budget -= decision.start
                self._launch(key, st, decision.start, decision.reason, running)
            elif decision.stop:
                await self._scale_down(key, st, decision.stop, decision.reason)

    async def _loads(self, todo: list[tuple[Key, _Fn, int]], now: float) -> list[ConsumerLoad | None]:
        gate = asyncio.Semaphore(CONCURRENT_READS)

        async def read(key: Key, st: _Fn) -> ConsumerLoad | None:
            async with gate:
                try:
                    load = await self.platform.consumer_load(key[0], key[1], st.spec)
                except Exception as exc:
                    log.warning("autoscaler: consumer of %s/%s.%s unreadable: %s", *key, exc)
                    return None
                st.read_at = now
                return load

        return list(await asyncio.gather(*(read(key, st) for key, st, _ in todo)))

    # ----------------------------------------------------------------- scale from zero

    async def _watch(self, key: Key, st: _Fn) -> None:
        if self.wakeups is None:
            return
        env, app, _ = key
        st.watching = True
        try:
            st.watch = await self.wakeups.watch(domain.function_subject(env, app, st.spec), lambda: self._woken(key))
        except Exception as exc:
            st.watching = False
            log.warning("autoscaler: cannot watch %s/%s.%s: %s", *key, exc)

    async def _unwatch(self, st: _Fn) -> None:
        watch, st.watch, st.watching = st.watch, None, False
        if watch is not None:
            with contextlib.suppress(Exception):
                await watch.unsubscribe()

    def _woken(self, key: Key) -> None:
        """First input seen for a function at zero: start one replica now (called from the subscription)."""
        st = self.fns.get(key)
        if st is None or st.watch is None:
            return
        watch, st.watch, st.watching = st.watch, None, False
        self._spawn(_quietly(watch.unsubscribe()))
        if st.starting or self.running(key) or self.control.deploying(key[0], key[1]):
            return
        if self.clock() < st.retry_at:
            return
        self._launch(key, st, 1, REASON_FROM_ZERO, 0)

    # ----------------------------------------------------------------- actions

    def _launch(self, key: Key, st: _Fn, n: int, reason: str, running: int) -> None:
        st.starting += n
        st.idle.touch(self.clock())
        self._spawn(self._start(key, st, n, reason, running))

    async def _start(self, key: Key, st: _Fn, n: int, reason: str, running: int) -> None:
        env, app, name = key
        release, spec = st.release, st.spec
        try:
            note = f"{reason}: starting {n} replica(s), {running} → {running + n} (scale_to {spec.scale_to})"
            await self.control.announce(env, app, release.release_id, name, Placement(OUTCOME_SCALE_UP, reason=note))
            results = await asyncio.gather(
                *(self.control.start_replica(release, spec) for _ in range(n)), return_exceptions=True
            )
            for res in results:
                if isinstance(res, BaseException):
                    st.retry_at = self.clock() + RETRY_S
                    if isinstance(res, NoCapacityError):
                        log.info("autoscaler: no capacity for %s/%s.%s: retry in %.0fs", env, app, name, RETRY_S)
                    elif isinstance(res, DuanFlowError):
                        log.warning("autoscaler: %s", res.message)
                    elif not isinstance(res, Exception):
                        raise res
                    else:
                        log.warning("autoscaler: start of %s/%s.%s failed: %s", env, app, name, res)
        finally:
            st.starting -= n

    async def _scale_down(self, key: Key, st: _Fn, n: int, reason: str) -> None:
        env, app, name = key
        recs = [r for r in self._replicas(key, st.release.release_id) if r.state == "running"][-n:]
        if not recs:
            return
        for rec in recs:
            self._stopping.add(rec.replica_id)
            decision = Placement(
                OUTCOME_SCALE_DOWN,
                agent_id=rec.agent_id,
                gpu_indices=rec.gpu_indices,
                reason=f"{reason}: stopping replica above keep_warm {st.spec.keep_warm}",
            )
            await self.control.announce(env, app, rec.release_id, name, decision, rec.replica_id)
        st.idle.touch(self.clock())
        self._spawn(self._stop(recs))

    async def _stop(self, recs: list[ReplicaRecord]) -> None:
        try:
            await self.control.stop_replicas(recs)
        except Exception as exc:
            log.warning("autoscaler: stopping %s: %s", [r.replica_id for r in recs], exc)
        finally:
            self._stopping.difference_update(r.replica_id for r in recs)


async def _quietly(aw: Awaitable[None]) -> None:
    with contextlib.suppress(Exception):
        await aw

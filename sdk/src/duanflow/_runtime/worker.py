"""The replica's serving loop: pull invocations, run the user's function, answer the caller, then ack."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import importlib
import inspect
import logging
import math
import signal
import sys
import time
import traceback
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Final, cast

import cloudpickle
import msgspec
import nats
import nats.errors
import nats.js.errors
from duanflow_proto import codec, subjects
from duanflow_proto.errors import (
    CallCancelledError,
    DeserializationError,
    DuanFlowError,
    FunctionTimeoutError,
    InvalidInputError,
    NotFoundError,
    PayloadTooLargeError,
)
from duanflow_proto.messages.common import Ack, ErrorReply
from duanflow_proto.messages.invocation import (
    CODEC_CLOUDPICKLE,
    CODEC_JSON,
    HDR_BUSY,
    HDR_CALL_ID,
    HDR_REPLY,
    HEARTBEAT_S,
    LOAD_REPORT_S,
    Invocation,
    InvocationBatch,
    ReplicaLoad,
    Result,
    ResultBatch,
)
from duanflow_proto.messages.release import FunctionSpec
from nats.aio.msg import Msg

from duanflow import _telemetry
from duanflow._app import find_app
from duanflow._inbox import more_to_read, publish_now, publish_soon, subscribe_direct, withdraw
from duanflow._payload import INLINE_MAX
from duanflow._payload import fetch as fetch_payload
from duanflow._payload import store as store_payload
from duanflow._runtime.batch import BatchRunner, decode_input, pickle_value
from duanflow._runtime.config import RuntimeConfig
from duanflow._runtime.http_calls import HttpCall, handle_http, is_http_target
from duanflow._runtime.inline import Gate, InlineTimeout, Watchdog, raw_publish
from duanflow._runtime.pull import Puller
from duanflow._runtime.stream import run_generator

log = logging.getLogger("duanflow.runtime")

FETCH_TIMEOUT_S: Final = 1.0
"""Longest a pull waits; SIGTERM is noticed within this (a pull is never abandoned, so no input is stranded)."""
CONNECT_TIMEOUT_S: Final = 15.0
RETRYABLE_CODES: Final = frozenset({"remote_error", "function_timeout"})
"""Failures of the user's code that ``retries=`` covers (not garbage input, which no retry can fix)."""


PREFETCH: Final = 8
"""Messages a replica pulls ahead of its free slots while every call it ran lately was fast (inline)."""
HEARTBEAT_FRACTION: Final = 3
"""Inputs running longer than ``ack_wait / 3`` tell JetStream they are in progress that often (their lease)."""
CANCELS_WAIT_S: Final = 2.0
"""How long a spawned call waits for the replica's view of cancelled calls before it runs anyway."""
CANCELS_KEPT: Final = 100_000
"""Cancelled call ids remembered per replica (oldest forgotten first)."""
STREAM_FIRST_S: Final = 0.1
"""After an input came from the stream, direct calls go there too for this long (see :meth:`Worker._on_direct`)."""


@dataclass(frozen=True, slots=True)
class Target:
    """The user's callable and its spec, as found in the imported module."""

    raw_f: Callable[..., Any]
    spec: FunctionSpec
    instance: Any = None
    """For lifecycle classes (``@app.cls``): the replica's one instance, its ``@df.enter`` hooks already run."""

    def method(self, name: str) -> Callable[..., Any]:
        """The callable an invocation names: the function itself, or a ``@df.method`` of the instance."""
        if self.instance is None:
            if name:
                raise InvalidInputError(f"{self.spec.name} is a function, not a class: it has no method {name!r}")
            return self.raw_f
        from duanflow._cls import method_names

        if name not in method_names(type(self.instance)):
            raise InvalidInputError(
                f"{self.spec.name} has no @df.method named {name!r} "
                f"(it has {', '.join(sorted(method_names(type(self.instance)))) or 'none'})"
            )
        return getattr(self.instance, name)  # type: ignore[no-any-return]


def load_target(config: RuntimeConfig) -> Target:
    """Import ``config.module`` by name (module scope runs once), find the App and the function in it."""
    module = importlib.import_module(config.module)
    app = find_app(module, config.app)
    registry = app._registry()
    fn = registry.get(config.function)
    if fn is None:
        raise LookupError(
            f"app {config.app!r} in module {config.module!r} has no function {config.function!r}"
            f" (it has {', '.join(sorted(registry)) or 'none'})"
        )
    if fn.spec.kind == "cls":
        from duanflow._cls import instantiate

        return Target(raw_f=fn.raw_f, spec=fn.spec, instance=instantiate(cast(type, fn.raw_f)))
    return Target(raw_f=fn.raw_f, spec=fn.spec)


class Worker:
    """Runs invocations of one function from its durable pull consumer, up to ``concurrency`` at once."""

    def __init__(self, config: RuntimeConfig, target: Target) -> None:
        self.config = config
        self.target = target
        self.is_async = inspect.iscoroutinefunction(target.raw_f)
        self.simulated = config.simulated_gpu and bool(target.spec.gpu)
        self.stopping = asyncio.Event()
        self._nc: Any = None
        self._js: Any = None
        self._results_kv: Any = None
        self._busy = 0
        """Inputs being run (each takes one of ``concurrency`` slots)."""
        self._backlog: collections.deque[Msg] = collections.deque()
        """Messages pulled ahead of a free slot (only while the function's calls are fast: see ``_free``)."""
        self._tg: asyncio.TaskGroup | None = None
        self._puller: Puller | None = None
        self._wake = asyncio.Event()
        self._running: dict[int, tuple[Msg | None, float]] = {}
        """Inputs being run, with when they started; the message for in_progress() heartbeats (None: a direct call,
        which has no lease)."""
        self._direct: Any = None
        """An endpoint's subscription to its direct subject (the gateway's fast path; see :meth:`_on_direct`)."""
        self._direct_busy = 0
        """Direct calls running now (each also takes one of the ``concurrency`` slots)."""
        self._direct_served = 0
        """Direct calls taken since start (reported to the router, which cannot see them in the consumer)."""
        self._spare: set[asyncio.Task[Any]] = set()
        self._from_stream_at = -math.inf
        """When an input last came from the stream (``time.monotonic()``)."""
        self._ack_wait_s = 30.0
        self._callables: dict[str, tuple[Callable[..., Any], bool, bool]] = {}
        self._executor = _executor(config.concurrency)
        self._gates: dict[str, Gate] = {}
        """Per method: whether its sync calls are fast enough to run on the loop thread."""
        self._watchdog = Watchdog()
        self.takes_request = is_http_target(target.raw_f)
        """True when the function wants the df.Request of HTTP calls (else the body's fields as kwargs)."""
        self._cancelled: dict[str, None] = {}
        """Ids of cancelled calls (the cancels bucket, watched); oldest first."""
        self._cancels_ready = asyncio.Event()
        """Set once the cancels bucket's current keys are in :attr:`_cancelled`."""
        self._active: dict[str, asyncio.Task[Any]] = {}
        """Spawned calls running now (the only ones ``FunctionCall.cancel()`` can name), by call id."""

    def _replace_executor(self) -> None:
        """After a timed-out sync call: its thread cannot be stopped, so new inputs get a fresh pool."""
        self._executor.shutdown(wait=False)
        self._executor = _executor(self.config.concurrency)

    def stop(self) -> None:
        """Stop pulling; inputs in flight finish (SIGTERM)."""
        if not self.stopping.is_set():
            log.info("replica %s stopping: finishing inputs in flight", self.config.replica_id)
            self.stopping.set()
            if self._puller is not None:
                self._puller.drain()
            self._wake.set()

    def _callable(self, method: str) -> tuple[Callable[..., Any], bool, bool]:
        """The callable for ``method`` (empty: the function), whether it is async, whether it is a generator."""
        found = self._callables.get(method)
        if found is None:
            fn = self.target.method(method)
            found = (
                fn,
                inspect.iscoroutinefunction(fn),
                inspect.isgeneratorfunction(fn) or inspect.isasyncgenfunction(fn),
            )
            self._callables[method] = found
        return found

    def _on_msg(self, msg: Msg) -> None:
        """A pulled message (in the read loop): start it, or hand it back at once when stopping."""
        tg = self._tg
        if tg is None or self.stopping.is_set():
            # Draining: hand it back at once (no delay), so another replica runs it now rather than after ack_wait.
            if tg is not None:
                tg.create_task(msg.nak())
            self._wake.set()
            return
        self._from_stream_at = time.monotonic()
        if self._busy < self.config.concurrency:
            self._busy += 1
            try:
                inv: Invocation | None = codec.decode(msg.data, Invocation)
            except InvalidInputError:  # a batch, or garbage: handle() tells them apart
                inv = None
            if inv is None or not self._run_now(msg, inv):
                tg.create_task(self._run_one(msg, inv=inv))
        else:
            self._backlog.append(msg)

    def _run_now(self, msg: Msg, inv: Invocation) -> bool:
        """Run ``inv`` (decoded from ``msg``), a plain call of a fast sync function, in this turn of the read loop:
        inline under the watchdog (as :meth:`call_sync` would), answered and acked from here, with no task and no
        loop turn before its result. False, having done nothing, for anything else (spawns, payloads in S3, async,
        slow or generator functions): :meth:`handle` runs it from a task.

        A failure that is to be retried is handed back from a task (its delay); so is a result too large for one
        message (it goes through S3 first).
        """
        tg = self._tg
        if tg is None:
            return False
        started = time.monotonic()
        if inv.codec != CODEC_CLOUDPICKLE or inv.payload_ref or inv.keep_result:
            return False
        if inv.deadline_ms and time.time() * 1000 > inv.deadline_ms:
            return False
        try:
            fn, is_async, is_gen = self._callable(inv.method)
            if is_async or is_gen or not self._gate(inv.method).inline:
                return False
            args, kwargs = self._arguments(inv)
        except DuanFlowError:
            return False
        reply = (msg.headers or {}).get(HDR_REPLY, "")
        with _telemetry.serving(msg, self.config.function):
            try:
                on_stuck = self._stuck_reporter(inv, reply)
                value = self.call_inline(inv.method, fn, args, kwargs, self.config.timeout_s, on_stuck)
            except Exception as exc:
                result: Result | bytes = self._error(inv, self._failure(inv, exc), started)
            except BaseException as exc:  # SystemExit & co. from the function: end the replica, as from a task
                tg.create_task(_reraise(exc))
                return True
            else:
                result = self._success(inv, value, started)
            if isinstance(result, Result) and self._retry_delay(msg, result) is None:
                if reply:
                    self.answer_now(reply, result)
                if self._puller is not None and self._puller.ack_next_now(msg, self._free() + 1):
                    self._give_back_slot()  # the +NXT asked for its next input already
                    return True
                rest = self._ack(msg)
            else:
                rest = self._finish(msg, inv, result, started, reply)
        tg.create_task(self._run_one(msg, work=rest))
        return True

    async def _finish(self, msg: Msg, inv: Invocation, result: Result | bytes, started: float, reply: str) -> None:
        """After a call ran: its result (through S3 first when too large), kept for a spawn, then the ack; or, for a
        failure with retries left, the message handed back with the retry's delay."""
        if not isinstance(result, Result):
            result = await self._through_s3(inv, result, started)
        delay = self._retry_delay(msg, result)
        if delay is not None:
            # The caller keeps waiting: it hears only the last attempt's outcome.
            log.warning(
                "call %s failed (%s); retrying in %.1fs", inv.call_id, result.error and result.error.code, delay
            )
            await msg.nak(delay=delay)
            return
        if reply:
            await self._answer(reply, result)
        if inv.keep_result:
            await self._keep(inv.call_id, result)
        await self._ack(msg)

    def _on_direct(self, msg: Msg) -> None:
        """A call on the endpoint's direct subject (in the read loop): run it in a free slot now, else answer
        ``Df-Busy`` and the gateway sends it to the stream. Never queued here: the router sees a backlog only in the
        consumer, and the stream is where a backlog waits.

        While the stream hands this replica inputs (one came within :data:`STREAM_FIRST_S`), direct calls go to the
        stream too: there they queue behind the calls that went before them, instead of taking each slot a finished
        input frees in the moment its pull request is on its way.
        """
        tg = self._tg
        if (
            tg is None
            or self.stopping.is_set()
            or self._busy >= self.config.concurrency
            or self._backlog
            or time.monotonic() - self._from_stream_at < STREAM_FIRST_S
        ):
            if msg.reply and not publish_soon(self._nc, msg.reply, b"", _BUSY):
                self._publish_later(msg.reply, b"", _BUSY)
            return
        self._busy += 1
        self._direct_busy += 1
        self._direct_served += 1
        if not self._serve_now(msg, tg):
            tg.create_task(self._run_one(msg, direct=True))

    def _serve_now(self, msg: Msg, tg: asyncio.TaskGroup) -> bool:
        """Run a direct call at once, in this turn of the read loop, when its handler is a sync one that
        :meth:`call_sync` would run inline anyway (recent calls fast, no input here near its heartbeat): no task and
        no loop turn before the answer. False, having done nothing, otherwise."""
        gate = self._gates.get("")  # endpoints are plain functions: their calls name no method
        if self.is_async or gate is None or not gate.inline or self.oldest_running_s() >= HEARTBEAT_S:
            return False
        try:
            with _telemetry.serving(msg, self.config.function):
                call = self._direct_call(msg)
                rest = call.run_now() if call is not None else None
        except BaseException as exc:  # SystemExit & co. from the handler: end the replica, as from a task
            tg.create_task(_reraise(exc))
            return True
        if rest is not None:  # a generator's chunks: the slot stays taken until they end
            tg.create_task(self._run_one(msg, direct=True, work=rest))
            return True
        self._direct_busy -= 1
        self._give_back_slot()
        return True

    async def handle_direct(self, msg: Msg) -> None:
        """Run one direct (HTTP) call: answer its caller (``Df-Reply``); nothing to ack."""
        call = self._direct_call(msg)
        if call is not None:
            await call.run()

    def _direct_call(self, msg: Msg) -> HttpCall | None:
        """The call a direct message carries; None when there is nothing to run (garbage, answered as such, or a
        call past its deadline)."""
        headers = msg.headers or {}
        reply = headers.get(HDR_REPLY, "")
        started = time.monotonic()
        try:
            inv = codec.decode(msg.data, Invocation)
            if inv.codec != CODEC_JSON:
                raise InvalidInputError(f"a direct call must be an HTTP call (codec json), not codec {inv.codec!r}")
        except InvalidInputError as exc:
            log.warning("malformed direct call on %s: %s", msg.subject, exc.message)
            if reply:
                self.answer_now(reply, Result(call_id=headers.get(HDR_CALL_ID, ""), ok=False, error=exc.to_reply()))
            return None
        if inv.deadline_ms and time.time() * 1000 > inv.deadline_ms:
            log.warning("call %s of %s arrived after its deadline: skipped", inv.call_id, self.config.function)
            return None
        return HttpCall(self, inv, reply, started)

    async def _report_load(self) -> None:
        """Tell the router what the direct path does, every ``LOAD_REPORT_S`` while it is in use."""
        cfg = self.config
        subject = subjects.replica_load(cfg.env, cfg.app, cfg.function)
        reported = 0
        while True:
            await asyncio.sleep(LOAD_REPORT_S)
            if self._direct_served == reported and not self._direct_busy:
                continue
            reported = self._direct_served
            load = ReplicaLoad(
                replica_id=cfg.replica_id,
                env=cfg.env,
                app=cfg.app,
                function=cfg.function,
                busy=self._direct_busy,
                served=reported,
            )
            try:
                await self._nc.publish(subject, codec.encode(load))
            except Exception as exc:
                log.debug("could not report the direct path's load: %r", exc)

    def _free(self) -> int:
        """Messages this replica can take now: its free slots, plus a few queued ones while its calls are fast."""
        gates = self._gates
        fast = bool(gates) and all(g.inline for g in gates.values())
        capacity = self.config.concurrency + (PREFETCH if fast else 0)
        return capacity - self._busy - len(self._backlog)

    async def _heartbeats(self) -> None:
        """Keep the lease of long inputs: ``in_progress()`` for each running longer than ``ack_wait / 3``."""
        every = max(0.2, self._ack_wait_s / HEARTBEAT_FRACTION)
        while True:
            await asyncio.sleep(every)
            now = time.monotonic()
            for msg, started in list(self._running.values()):
                if msg is not None and now - started >= every:
                    with contextlib.suppress(Exception):
                        await msg.in_progress()

    async def run(self) -> None:
        """Connect, bind the consumer, announce readiness, serve until :meth:`stop`, drain, disconnect."""
        cfg = self.config
        self._nc = await asyncio.wait_for(
            nats.connect(
                servers=[cfg.nats_url],
                user=cfg.nats_user or None,
                password=cfg.nats_password or None,
                name=f"duanflow-replica-{cfg.replica_id}",
                max_reconnect_attempts=-1,
                reconnect_time_wait=0.5,
            ),
            CONNECT_TIMEOUT_S,
        )
        watch: asyncio.Task[None] | None = None
        try:
            self._js = self._nc.jetstream()
            watch = asyncio.create_task(self._watch_cancels())
            try:
                info = await self._js.consumer_info(cfg.stream, cfg.consumer)
                self._ack_wait_s = float(info.config.ack_wait or self._ack_wait_s)
            except nats.js.errors.NotFoundError:
                raise NotFoundError(
                    f"consumer {cfg.consumer!r} does not exist on stream {cfg.stream!r}: "
                    "the router creates it when the app is deployed"
                ) from None
            puller = self._puller = Puller(self._nc, cfg.stream, cfg.consumer, self._on_msg, on_closed=self._wake.set)
            await puller.start()
            if self.target.spec.endpoint is not None:
                # An endpoint also serves the gateway's direct calls (core NATS, no stream) while it has free slots.
                self._direct = await subscribe_direct(
                    self._nc,
                    subjects.direct(cfg.env, cfg.app, cfg.function),
                    self._on_direct,
                    queue=subjects.DIRECT_QUEUE,
                )
            if self.simulated:
                print(
                    f"note: {cfg.function} runs on a simulated {self._gpu_label()} (no GPU on this machine)", flush=True
                )
            await self._nc.publish(subjects.replica_ready(cfg.replica_id), codec.encode(Ack(message=cfg.replica_id)))
            await self._nc.flush()
            _telemetry.replica_ready()
            log.info("replica %s ready: %s.%s from %s", cfg.replica_id, cfg.app, cfg.function, cfg.consumer)
            async with asyncio.TaskGroup() as tg:
                self._tg = tg
                beats = tg.create_task(self._heartbeats())
                loads = tg.create_task(self._report_load()) if self._direct is not None else None
                while not self.stopping.is_set():
                    try:
                        await puller.top_up(self._free())
                    except Exception as exc:
                        log.warning("pull from %s failed: %s", cfg.consumer, exc)
                    self._wake.clear()
                    await _wait(self._wake, min(FETCH_TIMEOUT_S, puller.next_expiry() + 0.05))
                # Draining: no new pull requests, and the server delivers nothing more on the open ones (their
                # inbox loses its interest there first; what was already on its way still arrives and is handed
                # back at once). Queued inputs are handed back too; those in flight finish. A fallback when the
                # withdrawal cannot be confirmed: keep the inbox until the open requests run out. The direct
                # subscription goes first, the same way: calls still on their way are answered Df-Busy (the gateway
                # sends them to the stream) rather than lost with a dropped subscription.
                if self._direct is not None:
                    await withdraw(self._nc, self._direct, CONNECT_TIMEOUT_S)
                    with contextlib.suppress(Exception):
                        await self._direct.unsubscribe()
                puller.drain()
                withdrawn = await puller.withdraw(CONNECT_TIMEOUT_S)
                while self._backlog:
                    await self._backlog.popleft().nak()
                while self._busy or (not withdrawn and puller.owed()):
                    self._wake.clear()
                    wait = FETCH_TIMEOUT_S if self._busy else min(FETCH_TIMEOUT_S, puller.drained_by() + 0.05)
                    await _wait(self._wake, wait)
                with contextlib.suppress(Exception):
                    await puller.stop()
                beats.cancel()
                if loads is not None:
                    loads.cancel()
            log.info("replica %s drained", cfg.replica_id)
        finally:
            if watch is not None:
                watch.cancel()
            # Not nc.drain(): it waits for the pull subscription's queue, which nothing reads any more.
            with contextlib.suppress(Exception):
                await self._nc.flush(timeout=5)
            with contextlib.suppress(Exception):
                await self._nc.close()

    async def _run_one(
        self,
        msg: Msg,
        *,
        direct: bool = False,
        work: Awaitable[None] | None = None,
        inv: Invocation | None = None,
    ) -> None:
        """Run one input in the slot taken for it: a message from the stream (``inv``: already decoded), or a
        direct call (no lease), or ``work`` (the rest of a call begun in the read loop)."""
        key = id(msg)
        self._running[key] = (None if direct else msg, time.monotonic())
        try:
            if work is not None:
                await work
                return
            with _telemetry.serving(msg, self.config.function):
                await (self.handle_direct(msg) if direct else self.handle(msg, inv))
        except Exception:
            log.exception("input on %s could not be handled", msg.subject)
        finally:
            del self._running[key]
            if direct:
                self._direct_busy -= 1
            await self._slot_freed()

    def _give_back_slot(self) -> bool:
        """An input finished: its slot goes to a queued input, if any. False while draining (nothing more starts)."""
        self._busy -= 1
        if self.stopping.is_set():
            self._wake.set()
            return False
        if self._backlog and self._tg is not None:
            self._busy += 1
            self._tg.create_task(self._run_one(self._backlog.popleft()))
        return True

    async def _slot_freed(self) -> None:
        """An input finished: start a queued one in its slot, or offer the slot to the consumer again."""
        if self._give_back_slot() and self._puller is not None:
            # Re-offer the slot now: the pull request leaves in the same flush as the result and the ack.
            try:
                await self._puller.top_up(self._free())
            except Exception:
                self._wake.set()

    async def handle(self, msg: Msg, inv: Invocation | None = None) -> None:
        """Run one invocation message (``inv``: its invocation, when already decoded): answer its caller
        (``Df-Reply``), then ack (or term garbage)."""
        headers = msg.headers or {}
        reply = headers.get(HDR_REPLY, "")
        started = time.monotonic()
        try:
            decoded = inv if inv is not None else codec.decode(msg.data, Invocation | InvocationBatch)  # type: ignore[arg-type]
        except InvalidInputError as exc:
            log.warning("malformed invocation on %s: %s", msg.subject, exc.message)
            if reply:
                await self._answer(reply, Result(call_id=headers.get(HDR_CALL_ID, ""), ok=False, error=exc.to_reply()))
            await msg.term()
            return
        if isinstance(decoded, InvocationBatch):
            await self._handle_batch(msg, decoded, reply)
            return
        inv = decoded
        if inv.codec == CODEC_JSON:
            # HTTP calls from the gateway: request object, streaming, heartbeats (duanflow._runtime.http_calls).
            if inv.deadline_ms and time.time() * 1000 > inv.deadline_ms:
                log.warning("call %s of %s arrived after its deadline: skipped", inv.call_id, self.config.function)
                await msg.term()
                return
            await handle_http(self, msg, inv, reply, started)
            return
        try:
            if inv.payload_ref:
                inv = msgspec.structs.replace(
                    inv, args=await fetch_payload(self._nc, inv.payload_ref), payload_ref=None
                )
            args, kwargs = self._arguments(inv)
        except DuanFlowError as exc:
            if reply:
                await self._answer(reply, self._error(inv, exc.to_reply(), started))
            await msg.term()
            return
        if inv.deadline_ms and time.time() * 1000 > inv.deadline_ms:
            # The caller stopped waiting: running it would only burn the GPU.
            log.warning("call %s of %s arrived after its deadline: skipped", inv.call_id, self.config.function)
            await msg.term()
            return
        if inv.keep_result:
            result = await self._execute_cancellable(inv, args, kwargs, started, reply)
        else:
            result = await self._execute(inv, args, kwargs, started, reply)
        await self._finish(msg, inv, result, started, reply)

    async def _watch_cancels(self) -> None:
        """Follow the cancels bucket: remember cancelled call ids and stop the ones running here."""
        try:
            kv = await self._js.key_value(subjects.KV_CANCELS)
            watcher = await kv.watch(">", ignore_deletes=True)
        except Exception as exc:
            log.warning("cannot watch %s (%s): cancel() will not reach this replica", subjects.KV_CANCELS, exc)
            self._cancels_ready.set()
            return
        try:
            async for entry in watcher:
                if entry is None:  # the bucket's current keys are all in
                    self._cancels_ready.set()
                    continue
                self._cancelled[entry.key] = None
                while len(self._cancelled) > CANCELS_KEPT:
                    del self._cancelled[next(iter(self._cancelled))]
                task = self._active.get(entry.key)
                if task is not None:
                    log.info("call %s was cancelled: stopping it", entry.key)
                    task.cancel()
        finally:
            self._cancels_ready.set()
            with contextlib.suppress(Exception):
                await watcher.stop()

    async def _execute_cancellable(
        self, inv: Invocation, args: tuple[Any, ...], kwargs: dict[str, Any], started: float, reply: str
    ) -> Result:
        """:meth:`_execute` for a spawned call: skipped when cancelled already, stopped when cancelled meanwhile."""
        if not self._cancels_ready.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._cancels_ready.wait(), CANCELS_WAIT_S)
        cancelled = CallCancelledError(f"call {inv.call_id} was cancelled", details={"call_id": inv.call_id})
        if inv.call_id in self._cancelled:
            log.info("call %s was cancelled before it started: skipped", inv.call_id)
            return self._error(inv, cancelled.to_reply(), started)
        task = asyncio.current_task()
        if task is None:
            return await self._execute(inv, args, kwargs, started, reply)
        self._active[inv.call_id] = task
        try:
            return await self._execute(inv, args, kwargs, started, reply)
        except asyncio.CancelledError:
            if inv.call_id not in self._cancelled:
                raise  # the replica is shutting down
            uncancel = getattr(task, "uncancel", None)  # Python 3.11+
            if uncancel is not None:
                uncancel()
            return self._error(inv, cancelled.to_reply(), started)
        finally:
            self._active.pop(inv.call_id, None)

    def _retry_delay(self, msg: Msg, result: Result) -> float | None:
        """Seconds before the next attempt when the function failed and has retries left, else None."""
        spec = self.target.spec
        if result.ok or spec.retries <= 0 or result.error is None or result.error.code not in RETRYABLE_CODES:
            return None
        try:
            attempt = msg.metadata.num_delivered or 1
        except Exception:
            return None
        if attempt > spec.retries:
            return None
        return float(min(spec.retry_max_delay_s, spec.retry_initial_delay_s * spec.retry_backoff ** (attempt - 1)))

    def _arguments(self, inv: Invocation) -> tuple[tuple[Any, ...], dict[str, Any]]:
        if inv.codec == CODEC_CLOUDPICKLE:
            return decode_input(inv.args, self.config.function, inv.python)
        try:
            if inv.codec == CODEC_JSON:
                body = msgspec.json.decode(inv.args) if inv.args else {}
                args, kwargs = body.get("args", []), body.get("kwargs", {})
            else:
                raise InvalidInputError(f"call {inv.call_id}: unknown codec {inv.codec!r} (cloudpickle or json)")
        except DuanFlowError:
            raise
        except Exception as exc:
            raise DeserializationError(
                f"the arguments of {self.config.function} could not be decoded on the replica "
                f"(Python {sys.version_info.major}.{sys.version_info.minor}, caller's {inv.python or 'unknown'}): "
                f"{type(exc).__name__}: {exc}"
            ) from None
        if not isinstance(args, (list, tuple)) or not isinstance(kwargs, dict):
            raise InvalidInputError(f"call {inv.call_id}: arguments must be (args, kwargs)")
        return tuple(args), kwargs

    async def call_sync(
        self,
        key: str,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        limit_s: float,
        on_stuck: Callable[[], None],
        *,
        inline_ok: bool = True,
    ) -> Any:
        """``fn(*args, **kwargs)`` of a sync callable: on the loop thread while its recent calls were fast (the
        gate of ``key``, and ``inline_ok``), else in the thread pool. Raises TimeoutError past ``limit_s``.

        A pooled call that times out or is cancelled cannot be stopped: its thread runs on, detached, and new inputs
        get a fresh pool.
        """
        gate = self._gate(key)
        if gate.inline and inline_ok:
            return self.call_inline(key, fn, args, kwargs, limit_s, on_stuck)
        t0 = time.monotonic()
        loop = asyncio.get_running_loop()
        try:
            value = await asyncio.wait_for(loop.run_in_executor(self._executor, _call, fn, args, kwargs), limit_s)
        except (TimeoutError, asyncio.CancelledError) as exc:
            gate.record(time.monotonic() - t0)
            if isinstance(exc, TimeoutError):
                log.warning("a call of %s timed out; its thread runs on, detached", self.config.function)
            self._replace_executor()
            raise
        except BaseException:
            gate.record(time.monotonic() - t0)
            raise
        gate.record(time.monotonic() - t0)
        return value

    def _gate(self, key: str) -> Gate:
        gate = self._gates.get(key)
        if gate is None:
            gate = self._gates[key] = Gate()
        return gate

    def call_inline(
        self,
        key: str,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        limit_s: float,
        on_stuck: Callable[[], None],
    ) -> Any:
        """``fn(*args, **kwargs)`` on this (the loop's) thread under the watchdog, its time noted in the gate of
        ``key``. Raises TimeoutError past ``limit_s``."""
        gate = self._gate(key)
        t0 = time.monotonic()
        try:
            value = self._watchdog.call(fn, args, kwargs, limit_s, on_stuck)
        except InlineTimeout:
            gate.record(limit_s)
            raise TimeoutError from None
        except BaseException:
            gate.record(time.monotonic() - t0)
            raise
        gate.record(time.monotonic() - t0)
        return value

    def oldest_running_s(self) -> float:
        """How long the longest-running input on this replica has been running (0 when none)."""
        for _, started in self._running.values():  # insertion order: the first is the oldest
            return time.monotonic() - started
        return 0.0

    async def _execute(
        self, inv: Invocation, args: tuple[Any, ...], kwargs: dict[str, Any], started: float, reply: str = ""
    ) -> Result:
        try:
            fn, is_async, is_gen = self._callable(inv.method)
        except DuanFlowError as exc:
            return self._error(inv, exc.to_reply(), started)
        timeout = self.config.timeout_s
        if is_gen:
            try:
                gen = fn(*args, **kwargs)
            except Exception as exc:
                return self._error(inv, remote_error(exc), started)
            return await run_generator(self, inv, reply, gen, started)
        try:
            if is_async:
                value = await asyncio.wait_for(fn(*args, **kwargs), timeout)
            else:
                value = await self.call_sync(inv.method, fn, args, kwargs, timeout, self._stuck_reporter(inv, reply))
        except Exception as exc:
            return self._error(inv, self._failure(inv, exc), started)
        result = self._success(inv, value, started)
        if isinstance(result, Result):
            return result
        return await self._through_s3(inv, result, started)

    def _failure(self, inv: Invocation, exc: Exception) -> ErrorReply:
        """The error reply for what a call raised: its timeout (TimeoutError), or the user's own exception."""
        if isinstance(exc, TimeoutError):
            timeout = self.config.timeout_s
            return FunctionTimeoutError(
                f"{self.config.function} ran past its timeout of {timeout:g}s",
                details={"call_id": inv.call_id, "timeout_s": f"{timeout:g}"},
            ).to_reply()
        return remote_error(exc)

    def _success(self, inv: Invocation, value: Any, started: float) -> Result | bytes:
        """The Result carrying ``value``; its pickled bytes instead when they are too large for a message (they go
        through S3: :meth:`_through_s3`)."""
        try:
            if inv.codec == CODEC_JSON:
                data, out_codec = msgspec.json.encode(value), CODEC_JSON
            else:
                data, out_codec = pickle_value(value), CODEC_CLOUDPICKLE
        except Exception as exc:
            bad = DeserializationError(
                f"the return value of {self.config.function} ({type(value).__name__}) cannot be serialized: {exc}"
            )
            return self._error(inv, bad.to_reply(), started)
        if len(data) > INLINE_MAX and out_codec == CODEC_CLOUDPICKLE:
            return data
        return self._ok(inv, data, out_codec, None, started)

    async def _through_s3(self, inv: Invocation, data: bytes, started: float) -> Result:
        try:
            ref = await store_payload(self._nc, data)
        except DuanFlowError as exc:
            return self._error(inv, exc.to_reply(), started)
        return self._ok(inv, b"", CODEC_CLOUDPICKLE, ref, started)

    def _ok(self, inv: Invocation, data: bytes, out_codec: str, ref: str | None, started: float) -> Result:
        return Result(
            call_id=inv.call_id,
            ok=True,
            value=data,
            payload_ref=ref,
            codec=out_codec,
            replica_id=self.config.replica_id,
            simulated_gpu=self.simulated,
            duration_us=int((time.monotonic() - started) * 1e6),
        )

    async def _handle_batch(self, msg: Msg, batch: InvocationBatch, reply: str) -> None:
        """Run the inputs of one slice of a ``.map()``; answer all of them in one message, then ack."""
        if batch.deadline_ms and time.time() * 1000 > batch.deadline_ms:
            log.warning("batch of %s arrived after its deadline: skipped", batch.call_id)
            await msg.term()
            return
        try:
            fn, is_async, is_gen = self._callable(batch.function.partition(".")[2])
            if is_gen:
                raise InvalidInputError(f"{self.config.function} is a generator: .map() takes plain functions")
        except DuanFlowError as exc:
            failed = Result(call_id=batch.call_id, ok=False, error=exc.to_reply(), replica_id=self.config.replica_id)
            results = [failed] * len(batch.inputs)
        else:
            results = await BatchRunner(self, batch, fn, is_async).run()
        if reply:
            await self._answer_batch(reply, batch.call_id, batch.first_index, results)
        await self._ack(msg)

    async def _ack(self, msg: Msg) -> None:
        """Ack a finished input; unless stopping, ask for the next one in the same message."""
        if self._puller is None or self.stopping.is_set() or not msg.reply:
            await msg.ack()
            return
        await self._puller.ack_next(msg, self._free() + 1)

    async def _answer_batch(self, reply: str, call_id: str, first: int, results: list[Result]) -> None:
        """Publish the results of a batch, split over several messages when they are too big for one."""
        data = codec.encode(ResultBatch(call_id=call_id, first_index=first, results=results))
        if len(data) > self._nc.max_payload and len(results) > 1:
            half = len(results) // 2
            await self._answer_batch(reply, call_id, first, results[:half])
            await self._answer_batch(reply, call_id, first + half, results[half:])
            return
        if len(data) > self._nc.max_payload:
            too_large = PayloadTooLargeError(
                f"the result of {self.config.function} is {len(data) / 2**20:.1f} MiB, over the "
                f"{self._nc.max_payload / 2**20:.1f} MiB a message can carry: return a smaller value "
                "or write it to storage and return its key"
            )
            failed = Result(call_id=call_id, ok=False, error=too_large.to_reply(), replica_id=self.config.replica_id)
            data = codec.encode(ResultBatch(call_id=call_id, first_index=first, results=[failed]))
        try:
            await self._nc.publish(reply, data, headers=_telemetry.result_headers())
        except Exception as exc:
            log.warning("could not answer %s: %s", reply, exc)

    def _stuck_reporter(self, inv: Invocation, reply: str) -> Callable[[], None]:
        """What the watchdog does for an inline call blocked past its timeout: tell the caller, on its own line."""

        def report() -> None:
            if not reply:
                return
            err = self._failure(inv, TimeoutError())
            data = codec.encode(Result(call_id=inv.call_id, ok=False, error=err, replica_id=self.config.replica_id))
            cfg = self.config
            raw_publish(cfg.nats_url, cfg.nats_user, cfg.nats_password, [(reply, data)])

        return report

    def _error(self, inv: Invocation, error: ErrorReply, started: float) -> Result:
        return Result(
            call_id=inv.call_id,
            ok=False,
            error=error,
            replica_id=self.config.replica_id,
            simulated_gpu=self.simulated,
            duration_us=int((time.monotonic() - started) * 1e6),
        )

    def _result_bytes(self, result: Result) -> bytes:
        """``result`` encoded, or an error saying it is too large for one message."""
        data = codec.encode(result)
        if len(data) > self._nc.max_payload:
            too_large = PayloadTooLargeError(
                f"the result of {self.config.function} is {len(data) / 2**20:.1f} MiB, over the "
                f"{self._nc.max_payload / 2**20:.1f} MiB a message can carry: return a smaller value "
                "or write it to storage and return its key"
            )
            data = codec.encode(
                Result(call_id=result.call_id, ok=False, error=too_large.to_reply(), replica_id=self.config.replica_id)
            )
        return data

    def answer_now(self, reply: str, result: Result) -> None:
        """Publish ``result`` to the caller from a plain function: straight to the socket when it is alone (the
        caller has it a loop turn sooner), else queued for nats-py's flusher with the others (one write for many);
        from a task only when neither can take it."""
        data = self._result_bytes(result)
        headers = _telemetry.result_headers()
        # Straight to the socket only when nothing else is on its way: calls read together answer together.
        alone = self._busy <= 1 and not self._backlog and not more_to_read(self._nc)
        if (alone and publish_now(self._nc, reply, data, headers)) or publish_soon(self._nc, reply, data, headers):
            return
        self._publish_later(reply, data, headers)

    def _publish_later(self, subject: str, data: bytes, headers: dict[str, str] | None) -> None:
        """Publish from a task (a plain function's fallback when the message cannot be queued at once)."""
        task = asyncio.get_running_loop().create_task(self._publish_quietly(subject, data, headers))
        self._spare.add(task)
        task.add_done_callback(self._spare.discard)

    async def _publish_quietly(self, subject: str, data: bytes, headers: dict[str, str] | None) -> None:
        try:
            await self._nc.publish(subject, data, headers=headers)
        except Exception as exc:
            log.warning("could not answer %s: %s", subject, exc)

    async def _answer(self, reply: str, result: Result) -> None:
        """Publish ``result`` to the caller (see :meth:`answer_now`)."""
        self.answer_now(reply, result)

    async def _keep(self, call_id: str, result: Result) -> None:
        """Store a spawned call's result in the results bucket, for ``FunctionCall.get()`` from any process."""
        try:
            if self._results_kv is None:
                self._results_kv = await self._js.key_value(subjects.KV_RESULTS)
            await self._results_kv.put(call_id, codec.encode(result))
        except Exception as exc:
            log.warning("could not keep the result of %s in %s: %s", call_id, subjects.KV_RESULTS, exc)

    def _gpu_label(self) -> str:
        gpus = self.target.spec.gpu
        return gpus[0] if len(gpus) == 1 else "GPU"


def remote_error(exc: BaseException) -> ErrorReply:
    """The wire form of an exception raised by user code (type, pickled exception, formatted traceback)."""
    exc_type = f"{type(exc).__module__}.{type(exc).__qualname__}"
    try:
        pickled: bytes | None = cloudpickle.dumps(exc)
    except Exception:
        pickled = None
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    return ErrorReply(
        code="remote_error",
        message=f"{type(exc).__name__}: {exc}",
        http_status=500,
        traceback=tb,
        exc_type=exc_type,
        exc_pickle=pickled,
    )


_BUSY: Final = {HDR_BUSY: "1"}


async def _reraise(exc: BaseException) -> None:
    raise exc


def _executor(concurrency: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="duanflow-fn")


def _call(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    return fn(*args, **kwargs)


async def _wait(event: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(event.wait(), seconds)


async def serve(config: RuntimeConfig, target: Target) -> None:
    """Serve ``target`` until SIGTERM/SIGINT, then finish the inputs in flight."""
    loop = asyncio.get_running_loop()
    worker = Worker(config, target)
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, worker.stop)
    if target.instance is not None:
        from duanflow._cls import run_hooks

        await run_hooks(target.instance, "enter", asynchronous=True)
        _telemetry.startup_phase("enter")
    try:
        await worker.run()
    finally:
        if target.instance is not None:
            from duanflow._cls import run_hooks

            await run_hooks(target.instance, "exit", asynchronous=True)
            await run_hooks(target.instance, "exit", asynchronous=False)

"""The replica's serving loop: pull invocations, run the user's function, answer the caller, then ack."""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import inspect
import logging
import signal
import sys
import time
import traceback
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Final

import cloudpickle
import msgspec
import nats
import nats.errors
import nats.js.errors
from duanflow_proto import codec, subjects
from duanflow_proto.errors import (
    DeserializationError,
    DuanFlowError,
    FunctionTimeoutError,
    InvalidInputError,
    NotFoundError,
    PayloadTooLargeError,
)
from duanflow_proto.messages.common import Ack, ErrorReply
from duanflow_proto.messages.invocation import CODEC_CLOUDPICKLE, CODEC_JSON, HDR_CALL_ID, HDR_REPLY, Invocation, Result
from duanflow_proto.messages.release import FunctionSpec
from nats.aio.msg import Msg

from duanflow._app import find_app
from duanflow._runtime.config import RuntimeConfig

log = logging.getLogger("duanflow.runtime")

FETCH_TIMEOUT_S: Final = 1.0
"""Longest a pull waits; SIGTERM is noticed within this (a pull is never abandoned, so no input is stranded)."""
CONNECT_TIMEOUT_S: Final = 15.0
RETRYABLE_CODES: Final = frozenset({"remote_error", "function_timeout"})
"""Failures of the user's code that ``retries=`` covers (not garbage input, which no retry can fix)."""


@dataclass(frozen=True, slots=True)
class Target:
    """The user's callable and its spec, as found in the imported module."""

    raw_f: Callable[..., Any]
    spec: FunctionSpec


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
        self._slots = asyncio.Semaphore(config.concurrency)
        self._executor = _executor(config.concurrency)

    def stop(self) -> None:
        """Stop pulling; inputs in flight finish (SIGTERM)."""
        if not self.stopping.is_set():
            log.info("replica %s stopping: finishing inputs in flight", self.config.replica_id)
            self.stopping.set()

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
        try:
            self._js = self._nc.jetstream()
            try:
                await self._js.consumer_info(cfg.stream, cfg.consumer)
            except nats.js.errors.NotFoundError:
                raise NotFoundError(
                    f"consumer {cfg.consumer!r} does not exist on stream {cfg.stream!r}: "
                    "the router creates it when the app is deployed"
                ) from None
            psub = await self._js.pull_subscribe_bind(durable=cfg.consumer, stream=cfg.stream)
            if self.simulated:
                print(
                    f"note: {cfg.function} runs on a simulated {self._gpu_label()} (no GPU on this machine)", flush=True
                )
            await self._nc.publish(subjects.replica_ready(cfg.replica_id), codec.encode(Ack(message=cfg.replica_id)))
            await self._nc.flush()
            log.info("replica %s ready: %s.%s from %s", cfg.replica_id, cfg.app, cfg.function, cfg.consumer)
            async with asyncio.TaskGroup() as tg:
                while not self.stopping.is_set():
                    await self._slots.acquire()
                    if self.stopping.is_set():
                        self._slots.release()
                        break
                    try:
                        msgs = await psub.fetch(1, timeout=FETCH_TIMEOUT_S)
                    except (TimeoutError, nats.errors.TimeoutError):
                        self._slots.release()
                        continue
                    except Exception as exc:
                        self._slots.release()
                        log.warning("pull from %s failed: %s", cfg.consumer, exc)
                        await _wait(self.stopping, FETCH_TIMEOUT_S)
                        continue
                    for msg in msgs:
                        tg.create_task(self._run_one(msg))
            log.info("replica %s drained", cfg.replica_id)
            with contextlib.suppress(Exception):
                await psub.unsubscribe()
        finally:
            # Not nc.drain(): it waits for the pull subscription's queue, which nothing reads any more.
            with contextlib.suppress(Exception):
                await self._nc.flush(timeout=5)
            with contextlib.suppress(Exception):
                await self._nc.close()

    async def _run_one(self, msg: Msg) -> None:
        try:
            await self.handle(msg)
        except Exception:
            log.exception("input on %s could not be handled", msg.subject)
        finally:
            self._slots.release()

    async def handle(self, msg: Msg) -> None:
        """Run one invocation message: answer its caller (``Df-Reply``), then ack (or term garbage)."""
        headers = msg.headers or {}
        reply = headers.get(HDR_REPLY, "")
        started = time.monotonic()
        try:
            inv = codec.decode(msg.data, Invocation)
        except InvalidInputError as exc:
            log.warning("malformed invocation on %s: %s", msg.subject, exc.message)
            if reply:
                await self._answer(reply, Result(call_id=headers.get(HDR_CALL_ID, ""), ok=False, error=exc.to_reply()))
            await msg.term()
            return
        try:
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
        result = await self._execute(inv, args, kwargs, started)
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
        await msg.ack()

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
        if inv.payload_ref:
            raise InvalidInputError(f"call {inv.call_id}: arguments stored at {inv.payload_ref} are not supported yet")
        try:
            if inv.codec == CODEC_CLOUDPICKLE:
                args, kwargs = cloudpickle.loads(inv.args) if inv.args else ((), {})
            elif inv.codec == CODEC_JSON:
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

    async def _execute(self, inv: Invocation, args: tuple[Any, ...], kwargs: dict[str, Any], started: float) -> Result:
        fn = self.target.raw_f
        timeout = self.config.timeout_s
        try:
            if self.is_async:
                value = await asyncio.wait_for(fn(*args, **kwargs), timeout)
            else:
                loop = asyncio.get_running_loop()
                value = await asyncio.wait_for(loop.run_in_executor(self._executor, _call, fn, args, kwargs), timeout)
        except TimeoutError:
            err = FunctionTimeoutError(
                f"{self.config.function} ran past its timeout of {timeout:g}s",
                details={"call_id": inv.call_id, "timeout_s": f"{timeout:g}"},
            )
            if not self.is_async:
                # A thread cannot be stopped: leave it to finish on the old pool, give new inputs a fresh one.
                log.warning("call %s timed out; its thread runs on, detached", inv.call_id)
                self._executor.shutdown(wait=False)
                self._executor = _executor(self.config.concurrency)
            return self._error(inv, err.to_reply(), started)
        except Exception as exc:
            return self._error(inv, remote_error(exc), started)
        try:
            if inv.codec == CODEC_JSON:
                data, out_codec = msgspec.json.encode(value), CODEC_JSON
            else:
                data, out_codec = cloudpickle.dumps(value), CODEC_CLOUDPICKLE
        except Exception as exc:
            bad = DeserializationError(
                f"the return value of {self.config.function} ({type(value).__name__}) cannot be serialized: {exc}"
            )
            return self._error(inv, bad.to_reply(), started)
        return Result(
            call_id=inv.call_id,
            ok=True,
            value=data,
            codec=out_codec,
            replica_id=self.config.replica_id,
            simulated_gpu=self.simulated,
            duration_us=int((time.monotonic() - started) * 1e6),
        )

    def _error(self, inv: Invocation, error: ErrorReply, started: float) -> Result:
        return Result(
            call_id=inv.call_id,
            ok=False,
            error=error,
            replica_id=self.config.replica_id,
            simulated_gpu=self.simulated,
            duration_us=int((time.monotonic() - started) * 1e6),
        )

    async def _answer(self, reply: str, result: Result) -> None:
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
        try:
            await self._nc.publish(reply, data)
        except Exception as exc:
            log.warning("could not answer %s: %s", reply, exc)

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
    await worker.run()

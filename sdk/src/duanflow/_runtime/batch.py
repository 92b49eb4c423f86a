"""Running the inputs of one :class:`InvocationBatch` (a slice of a ``.map()``).

A sync function runs the whole batch in one hop to a worker thread (decode, call, encode per input), so a tiny
function costs microseconds per input instead of a thread hand-off each. The loop watches the thread: an input
that overruns the timeout is reported as timed out, its thread is left behind (a thread cannot be stopped) with
a flag telling it to run nothing more, and the rest of the batch goes on in a fresh thread. Async functions run
their inputs one after another on the loop. Failed inputs are retried in place, with the function's backoff,
and report their last error.
"""

from __future__ import annotations

import asyncio
import pickle
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import cloudpickle
import msgspec
from duanflow_proto.errors import DeserializationError, DuanFlowError, FunctionTimeoutError, InvalidInputError
from duanflow_proto.messages.common import ErrorReply
from duanflow_proto.messages.invocation import CODEC_CLOUDPICKLE, InvocationBatch, Result
from duanflow_proto.messages.release import FunctionSpec

from duanflow._payload import INLINE_MAX
from duanflow._payload import fetch as fetch_payload
from duanflow._payload import store as store_payload

if TYPE_CHECKING:
    from duanflow._runtime.worker import Worker

RETRYABLE: frozenset[str] = frozenset({"remote_error", "function_timeout"})


@dataclass(slots=True)
class _Progress:
    """Shared between the loop and the thread running a batch."""

    started: float = 0.0
    """When the current input started (monotonic)."""
    done: int = 0
    """Inputs finished."""
    cancelled: bool = False
    """Set by the loop when it gives up on the thread: it must run nothing more."""
    outcomes: list[Result] = field(default_factory=list)


_PLAIN: frozenset[type] = frozenset({int, float, str, bytes, bool, type(None)})


def pickle_value(value: Any) -> bytes:
    """A return value, pickled: plain values by the stdlib's faster pickler (same format), others by cloudpickle."""
    if type(value) in _PLAIN:
        return pickle.dumps(value, protocol=5)
    data: bytes = cloudpickle.dumps(value)
    return data


def decode_input(data: bytes, function: str, python: str) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """One input's ``(args, kwargs)``; undecodable ones say which Pythons were involved."""
    try:
        args, kwargs = cloudpickle.loads(data) if data else ((), {})
    except Exception as exc:
        raise DeserializationError(
            f"the arguments of {function} could not be unpickled on the replica "
            f"(replica Python {sys.version_info.major}.{sys.version_info.minor}, caller's {python or 'unknown'}"
            f"{'' if python in ('', f'{sys.version_info.major}.{sys.version_info.minor}') else ': the versions differ'}"
            f"): {type(exc).__name__}: {exc}"
        ) from None
    if not isinstance(args, (list, tuple)) or not isinstance(kwargs, dict):
        raise InvalidInputError(f"the arguments of {function} must be (args, kwargs)")
    return tuple(args), kwargs


def retry_delay(spec: FunctionSpec, attempt: int) -> float:
    """Seconds before retry ``attempt`` (1 for the first retry)."""
    return float(min(spec.retry_max_delay_s, spec.retry_initial_delay_s * spec.retry_backoff ** (attempt - 1)))


class BatchRunner:
    """Runs one batch for ``worker`` and returns one Result per input, in order."""

    def __init__(self, worker: Worker, batch: InvocationBatch, fn: Callable[..., Any], is_async: bool) -> None:
        self.worker = worker
        self.batch = batch
        self.fn = fn
        self.is_async = is_async
        self.name = worker.config.function if not batch.function else batch.function
        self.timeout = worker.config.timeout_s
        self.spec = worker.target.spec

    def _ok(self, value: Any, started: float) -> Result:
        try:
            data = pickle_value(value)
        except Exception as exc:
            bad = DeserializationError(
                f"the return value of {self.name} ({type(value).__name__}) cannot be pickled: {exc}"
            )
            return self._err(bad.to_reply(), started)
        return Result(
            call_id=self.batch.call_id,
            ok=True,
            value=data,
            codec=CODEC_CLOUDPICKLE,
            simulated_gpu=self.worker.simulated,
            duration_us=int((time.monotonic() - started) * 1e6),
        )

    def _err(self, error: ErrorReply, started: float) -> Result:
        return Result(
            call_id=self.batch.call_id,
            ok=False,
            error=error,
            replica_id=self.worker.config.replica_id,
            simulated_gpu=self.worker.simulated,
            duration_us=int((time.monotonic() - started) * 1e6),
        )

    def _timeout_error(self, started: float) -> Result:
        err = FunctionTimeoutError(
            f"{self.name} ran past its timeout of {self.timeout:g}s",
            details={"call_id": self.batch.call_id, "timeout_s": f"{self.timeout:g}"},
        )
        return self._err(err.to_reply(), started)

    # -- sync functions: one thread hop per batch ----------------------------------------------------------

    def _run_in_thread(self, start: int, progress: _Progress) -> None:
        from duanflow._runtime.worker import remote_error

        inputs = self.batch.inputs
        for i in range(start, len(inputs)):
            if progress.cancelled:
                return
            started = progress.started = time.monotonic()
            try:
                args, kwargs = decode_input(inputs[i], self.name, self.batch.python)
            except DuanFlowError as exc:
                progress.outcomes.append(self._err(exc.to_reply(), started))
                progress.done += 1
                continue
            attempt = 0
            while True:
                try:
                    value = self.fn(*args, **kwargs)
                except Exception as exc:
                    if attempt < self.spec.retries and not progress.cancelled:
                        attempt += 1
                        delay = retry_delay(self.spec, attempt)
                        progress.started = time.monotonic() + delay
                        time.sleep(delay)
                        continue
                    outcome = self._err(remote_error(exc), started)
                else:
                    outcome = self._ok(value, started)
                break
            if progress.cancelled:
                return
            progress.outcomes.append(outcome)
            progress.done += 1

    async def _run_sync(self) -> list[Result]:
        loop = asyncio.get_running_loop()
        results: list[Result] = []
        n = len(self.batch.inputs)
        while len(results) < n:
            progress = _Progress(started=time.monotonic())
            start = len(results)
            fut = loop.run_in_executor(self.worker._executor, self._run_in_thread, start, progress)
            while not fut.done():
                budget = progress.started + self.timeout - time.monotonic()
                if budget > 0:
                    await asyncio.wait({fut}, timeout=budget)
                    continue
                # The input at start + progress.done overran: report it, abandon the thread, go on.
                progress.cancelled = True
                results.extend(progress.outcomes[: progress.done])
                results.append(self._timeout_error(progress.started))
                self.worker._replace_executor()
                break
            else:
                fut.result()
                results.extend(progress.outcomes)
        return results

    # -- async functions: on the loop, one after another ---------------------------------------------------

    async def _run_async(self) -> list[Result]:
        from duanflow._runtime.worker import remote_error

        results: list[Result] = []
        for data in self.batch.inputs:
            started = time.monotonic()
            try:
                args, kwargs = decode_input(data, self.name, self.batch.python)
            except DuanFlowError as exc:
                results.append(self._err(exc.to_reply(), started))
                continue
            attempt = 0
            while True:
                try:
                    value = await asyncio.wait_for(self.fn(*args, **kwargs), self.timeout)
                except TimeoutError:
                    outcome = self._timeout_error(started)
                except Exception as exc:
                    outcome = self._err(remote_error(exc), started)
                else:
                    outcome = self._ok(value, started)
                    break
                if attempt >= self.spec.retries or outcome.error is None or outcome.error.code not in RETRYABLE:
                    break
                attempt += 1
                await asyncio.sleep(retry_delay(self.spec, attempt))
            results.append(outcome)
        return results

    async def run(self) -> list[Result]:
        """Every input's Result, in input order; inputs and results over ``INLINE_MAX`` travel through S3."""
        if self.batch.input_refs:
            try:
                inputs = list(self.batch.inputs)
                for offset, ref in self.batch.input_refs.items():
                    inputs[offset] = await fetch_payload(self.worker._nc, ref)
            except DuanFlowError as exc:
                return [self._err(exc.to_reply(), time.monotonic())] * len(self.batch.inputs)
            self.batch = msgspec.structs.replace(self.batch, inputs=inputs, input_refs={})
        results = await (self._run_async() if self.is_async else self._run_sync())
        for i, result in enumerate(results):
            if len(result.value) > INLINE_MAX:
                try:
                    ref = await store_payload(self.worker._nc, result.value)
                except DuanFlowError as exc:
                    results[i] = self._err(exc.to_reply(), time.monotonic())
                else:
                    results[i] = msgspec.structs.replace(result, value=b"", payload_ref=ref)
        return results

"""The replica loop of an ``@app.worker``: pull jobs from the queue's durable consumer, run them, ack.

An ack is sent once the job returned, without waiting for the server's answer (a lost ack only means the job runs
again after ``ack_wait``: the function deduplicates on :func:`~duanflow.current_job_id`).

A job that raises is nak'ed with an exponential delay (``spec.retry_*``) while it has retries left; after
``spec.retries + 1`` failed attempts it is published to the queue's dead-letter subject (with the last error and
traceback) and then acked, so a job is never dropped and never retried forever. A replica that dies mid-job never
acks: the consumer hands the job out again after ``ack_wait``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import contextvars
import inspect
import logging
import signal
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Final

import nats
import nats.errors
import nats.js.errors
from duanflow_proto import codec, subjects
from duanflow_proto.errors import FunctionTimeoutError, NotFoundError
from duanflow_proto.messages.common import Ack
from duanflow_proto.messages.queue import HDR_JOB_ID, DeadLetter
from duanflow_proto.messages.release import FunctionSpec
from nats.aio.msg import Msg

from duanflow._queue import HDR_MSG_ID, _current_job, decode_job, encode_dead_letter
from duanflow._runtime.config import RuntimeConfig
from duanflow._runtime.inline import Gate, InlineTimeout, Watchdog
from duanflow._runtime.pull import Puller
from duanflow._runtime.worker import Target

log = logging.getLogger("duanflow.runtime.queue")

FETCH_TIMEOUT_S: Final = 1.0
"""Longest a pull waits; SIGTERM is noticed within this."""
CONNECT_TIMEOUT_S: Final = 15.0
CLOSE_TIMEOUT_S: Final = 5.0
PREFETCH: Final = 512
"""Jobs a replica pulls ahead of its free slots while its jobs are fast (run inline, one after another)."""
INLINE_YIELD_EVERY: Final = 64
"""Inline jobs run between two yields to the event loop (which reads more jobs and sends the acks)."""


def is_queue_worker(spec: FunctionSpec) -> bool:
    """Whether a replica of ``spec`` consumes a work queue (``@app.worker``) rather than invocations."""
    return spec.kind == "worker" or bool(spec.queue)


def retry_delay(spec: FunctionSpec, attempt: int) -> float:
    """Seconds before retry number ``attempt`` (from 1): exponential, capped at ``retry_max_delay_s``."""
    delay = spec.retry_initial_delay_s * spec.retry_backoff ** max(0, attempt - 1)
    return float(min(spec.retry_max_delay_s, delay))


def job_id_of(msg: Msg) -> str:
    """A job's stable id: its ``Df-Job-Id`` header, else the stream sequence it was stored under."""
    headers = msg.headers or {}
    job_id = headers.get(HDR_JOB_ID, "")
    if job_id:
        return job_id
    return f"seq-{msg.metadata.sequence.stream}"


class QueueWorker:
    """Runs the jobs of one queue, up to ``concurrency`` at once.

    Pulls through :class:`~duanflow._runtime.pull.Puller` (requests matching the free slots; each ack asks for the
    next jobs in the same message). A sync function whose recent jobs were fast runs inline on the loop thread, one
    job after another from the pulled batch (no task or thread hop per job; the watchdog enforces ``timeout``), and
    then pulls up to :data:`PREFETCH` jobs ahead; a slow one runs in a thread of its own, an async one in a task.
    """

    def __init__(self, config: RuntimeConfig, target: Target) -> None:
        self.config = config
        self.target = target
        self.spec = target.spec
        self.queue = self.spec.queue or ""
        self.is_async = inspect.iscoroutinefunction(target.raw_f)
        self.stopping = asyncio.Event()
        self._js: Any = None
        self._nc: Any = None
        self._puller: Puller | None = None
        self._wake = asyncio.Event()
        self._busy = 0
        """Jobs being run (each takes one of ``concurrency`` slots)."""
        self._backlog: collections.deque[Msg] = collections.deque()
        """Jobs pulled and not started yet."""
        self._tasks: set[asyncio.Task[None]] = set()
        self._inline_running = False
        self._gate = Gate()
        self._watchdog = Watchdog()
        self._executor = ThreadPoolExecutor(max_workers=config.concurrency, thread_name_prefix="duanflow-job")

    def stop(self) -> None:
        """Stop pulling; jobs in flight finish, jobs pulled and not started go back to the queue (SIGTERM)."""
        if not self.stopping.is_set():
            self.stopping.set()
            if self._puller is not None:
                self._puller.drain()
            self._wake.set()

    def _fast(self) -> bool:
        return not self.is_async and self._gate.inline

    def _free(self) -> int:
        """Jobs this replica can take now: its free slots, plus a batch ahead while its jobs are fast."""
        capacity = self.config.concurrency + (PREFETCH if self._fast() else 0)
        return capacity - self._busy - len(self._backlog)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _on_msg(self, msg: Msg) -> None:
        """A pulled job (in the connection's read loop, no awaiting): queue it and start what can start."""
        if self.stopping.is_set():
            # Draining: hand it back now, so another replica runs it rather than after ack_wait.
            self._spawn(msg.nak())
            self._wake.set()
            return
        self._backlog.append(msg)
        self._dispatch()

    def _dispatch(self) -> None:
        if self._fast():
            if not self._inline_running and self._backlog:
                self._inline_running = True
                self._spawn(self._run_inline())
            return
        while self._backlog and self._busy < self.config.concurrency:
            self._busy += 1
            self._spawn(self._run_one(self._backlog.popleft()))

    async def _run_inline(self) -> None:
        """Run the backlog's jobs one after another on the loop thread while they stay fast."""
        backlog = self._backlog
        done = 0
        try:
            while backlog and self._fast() and not self.stopping.is_set():
                msg = backlog.popleft()
                self._busy += 1
                try:
                    await self.handle(msg, inline=True)
                except Exception:
                    log.exception("job of queue %s could not be settled (it comes back after ack_wait)", self.queue)
                finally:
                    self._busy -= 1
                done += 1
                if done % INLINE_YIELD_EVERY == 0:
                    await asyncio.sleep(0)  # the read loop delivers, the flusher sends the acks
        finally:
            self._inline_running = False
            if self.stopping.is_set():
                self._wake.set()
            elif backlog:
                self._dispatch()
            await self._top_up()

    async def _run_one(self, msg: Msg) -> None:
        try:
            await self.handle(msg, inline=False)
        except Exception:
            log.exception("job of queue %s could not be settled (it comes back after ack_wait)", self.queue)
        finally:
            self._busy -= 1
            if self.stopping.is_set():
                self._wake.set()
            else:
                self._dispatch()
                await self._top_up()

    async def _top_up(self) -> None:
        if self._puller is not None and not self.stopping.is_set():
            try:
                await self._puller.top_up(self._free())
            except Exception:
                self._wake.set()

    def _on_reconnected(self) -> None:
        # The server forgot the pull requests it had (a restart): ask again now rather than after they expire.
        if self._puller is not None:
            self._puller.forget()
        self._wake.set()

    async def run(self) -> None:
        """Connect, announce readiness, pull and run jobs until stopped, then drain."""
        cfg = self.config

        async def reconnected() -> None:
            self._on_reconnected()

        nc = self._nc = await asyncio.wait_for(
            nats.connect(
                servers=[cfg.nats_url],
                user=cfg.nats_user or None,
                password=cfg.nats_password or None,
                name=f"duanflow-replica-{cfg.replica_id}",
                reconnect_time_wait=0.5,
                max_reconnect_attempts=-1,
                reconnected_cb=reconnected,
            ),
            CONNECT_TIMEOUT_S,
        )
        try:
            self._js = nc.jetstream()
            try:
                await self._js.consumer_info(cfg.stream, cfg.consumer)
            except nats.js.errors.NotFoundError:
                raise NotFoundError(
                    f"consumer {cfg.consumer!r} does not exist on stream {cfg.stream!r}: "
                    "the router creates it when the app is deployed"
                ) from None
            puller = self._puller = Puller(nc, cfg.stream, cfg.consumer, self._on_msg, on_closed=self._wake.set)
            await puller.start()
            await nc.publish(subjects.replica_ready(cfg.replica_id), codec.encode(Ack(message=cfg.replica_id)))
            await nc.flush()
            log.info("worker of queue %s ready (replica %s)", self.queue, cfg.replica_id)
            while not self.stopping.is_set():
                try:
                    await puller.top_up(self._free())
                except Exception as exc:
                    log.warning("pull from queue %s failed: %s: %s", self.queue, type(exc).__name__, exc)
                self._wake.clear()
                await _wait(self._wake, min(FETCH_TIMEOUT_S, puller.next_expiry() + 0.05))
            # Draining: no new pull requests and the server delivers nothing more on the open ones; jobs pulled and
            # not started go back at once; those running finish and are acked. When the withdrawal cannot be
            # confirmed, the inbox stays until the open requests run out (what they bring is handed back).
            puller.drain()
            withdrawn = await puller.withdraw(CONNECT_TIMEOUT_S)
            while self._backlog:
                with contextlib.suppress(Exception):
                    await self._backlog.popleft().nak()
            while self._busy or self._inline_running or (not withdrawn and puller.owed()):
                self._wake.clear()
                wait = FETCH_TIMEOUT_S if self._busy else min(FETCH_TIMEOUT_S, puller.drained_by() + 0.05)
                await _wait(self._wake, wait)
            with contextlib.suppress(Exception):
                await puller.stop()
            if self._tasks:
                await asyncio.gather(*list(self._tasks), return_exceptions=True)
        finally:
            # Flush (the last acks), then close: a drain can wait on the pull subscription's inbox for long.
            with contextlib.suppress(Exception):
                await nc.flush(timeout=int(CLOSE_TIMEOUT_S))
            with contextlib.suppress(Exception):
                await asyncio.wait_for(nc.close(), CLOSE_TIMEOUT_S)
            self._executor.shutdown(wait=False)

    async def handle(self, msg: Msg, *, inline: bool = False) -> None:
        """Run one job; ack it, nak it with a delay, or dead-letter it."""
        job_id = job_id_of(msg)
        token = _current_job.set(job_id)
        try:
            await self._call(decode_job(msg.data), inline)
        except Exception as exc:
            _current_job.reset(token)
            await self._failed(msg, job_id, exc)
            return
        _current_job.reset(token)
        await self._ack(msg)

    async def _ack(self, msg: Msg) -> None:
        """Ack a finished job (no round trip); unless stopping, ask for the next jobs in the same message."""
        puller = self._puller
        if puller is None or self.stopping.is_set() or not msg.reply:
            await msg.ack()
            return
        await puller.ack_next(msg, self._free() + 1)

    async def _failed(self, msg: Msg, job_id: str, exc: Exception) -> None:
        attempt = int(msg.metadata.num_delivered or 1)
        if attempt > self.spec.retries:
            await self._dead_letter(msg, job_id, attempt, exc)
            await msg.ack_sync()
            return
        delay = retry_delay(self.spec, attempt)
        log.warning(
            "job %s of queue %s failed (attempt %d of %d), retrying in %.1fs: %s: %s",
            job_id,
            self.queue,
            attempt,
            self.spec.retries + 1,
            delay,
            type(exc).__name__,
            exc,
        )
        await msg.nak(delay=delay)

    async def _call(self, job: Any, inline: bool) -> Any:
        f = self.target.raw_f
        timeout = self.config.timeout_s
        if self.is_async:
            try:
                return await asyncio.wait_for(f(job), timeout)
            except TimeoutError:
                raise self._timed_out() from None
        gate = self._gate
        started = time.monotonic()
        if inline:
            try:
                value = self._watchdog.call(f, (job,), {}, timeout)
            except InlineTimeout:
                gate.record(timeout)
                raise self._timed_out() from None
            except BaseException:
                gate.record(time.monotonic() - started)
                raise
            gate.record(time.monotonic() - started)
            return value
        # The thread runs in a copy of this context: the function sees current_job_id() there too.
        run = contextvars.copy_context().run
        try:
            value = await asyncio.wait_for(
                asyncio.get_running_loop().run_in_executor(self._executor, run, f, job), timeout
            )
        except TimeoutError:
            gate.record(timeout)
            # The thread cannot be stopped: it runs on, detached; later jobs get a fresh pool.
            self._executor.shutdown(wait=False)
            self._executor = ThreadPoolExecutor(self.config.concurrency, thread_name_prefix="duanflow-job")
            raise self._timed_out() from None
        except BaseException:
            gate.record(time.monotonic() - started)
            raise
        gate.record(time.monotonic() - started)
        return value

    def _timed_out(self) -> FunctionTimeoutError:
        return FunctionTimeoutError(f"the job ran past the worker's timeout of {self.config.timeout_s:g}s")

    async def _dead_letter(self, msg: Msg, job_id: str, attempt: int, exc: BaseException) -> None:
        letter = DeadLetter(
            job_id=job_id,
            queue=self.queue,
            attempts=attempt,
            error=f"{type(exc).__name__}: {exc}"[:4000],
            exc_type=f"{type(exc).__module__}.{type(exc).__qualname__}",
            traceback="".join(traceback.format_exception(type(exc), exc, exc.__traceback__))[-16000:],
            data=msg.data,
            failed_at=time.time(),
        )
        # De-duplicated per job and attempt: a re-run of this step (after a crash) stores one dead letter.
        await self._js.publish(
            subjects.dead_letter(self.config.env, self.queue),
            encode_dead_letter(letter),
            headers={HDR_JOB_ID: job_id, HDR_MSG_ID: f"dlq-{job_id}-{msg.metadata.sequence.stream}"},
        )
        log.error("job %s of queue %s dead-lettered after %d attempts: %s", job_id, self.queue, attempt, letter.error)


async def _wait(event: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(event.wait(), seconds)


async def serve(config: RuntimeConfig, target: Target) -> None:
    """Run ``target``'s queue until SIGTERM/SIGINT, then finish the jobs in flight."""
    worker = QueueWorker(config, target)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, worker.stop)
    await worker.run()

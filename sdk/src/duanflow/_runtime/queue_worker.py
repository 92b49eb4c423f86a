"""The replica loop of an ``@app.worker``: pull jobs from the queue's durable consumer, run them, ack.

A job that raises is nak'ed with an exponential delay (``spec.retry_*``) while it has retries left; after
``spec.retries + 1`` failed attempts it is published to the queue's dead-letter subject (with the last error and
traceback) and then acked, so a job is never dropped and never retried forever. A replica that dies mid-job never
acks: the consumer hands the job out again after ``ack_wait``.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import signal
import time
import traceback
from typing import Any, Final

import nats
import nats.errors
from duanflow_proto import codec, subjects
from duanflow_proto.messages.common import Ack
from duanflow_proto.messages.queue import HDR_JOB_ID, DeadLetter
from duanflow_proto.messages.release import FunctionSpec
from nats.aio.msg import Msg

from duanflow._queue import HDR_MSG_ID, _current_job, decode_job, encode_dead_letter
from duanflow._runtime.config import RuntimeConfig
from duanflow._runtime.worker import Target

log = logging.getLogger("duanflow.runtime.queue")

FETCH_TIMEOUT_S: Final = 1.0
"""Longest a pull waits; SIGTERM is noticed within this."""
CONNECT_TIMEOUT_S: Final = 15.0
CLOSE_TIMEOUT_S: Final = 5.0
RECONNECT_PAUSE_S: Final = 0.2
"""Pause after a failed pull (server gone or restarting) before the next one."""


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
    """Runs the jobs of one queue, up to ``concurrency`` at once."""

    def __init__(self, config: RuntimeConfig, target: Target) -> None:
        self.config = config
        self.target = target
        self.spec = target.spec
        self.queue = self.spec.queue or ""
        self.stopping = asyncio.Event()
        self._slots = asyncio.Semaphore(config.concurrency)
        self._tasks: set[asyncio.Task[None]] = set()
        self._js: Any = None

    def stop(self) -> None:
        """Stop pulling; jobs in flight finish (SIGTERM)."""
        self.stopping.set()

    async def run(self) -> None:
        """Connect, announce readiness, pull and run jobs until stopped, then drain."""
        cfg = self.config
        nc = await asyncio.wait_for(
            nats.connect(
                servers=[cfg.nats_url],
                user=cfg.nats_user or None,
                password=cfg.nats_password or None,
                name=f"duanflow-replica-{cfg.replica_id}",
                reconnect_time_wait=0.5,
                max_reconnect_attempts=-1,
            ),
            CONNECT_TIMEOUT_S,
        )
        try:
            self._js = nc.jetstream()
            sub = await self._js.pull_subscribe_bind(durable=cfg.consumer, stream=cfg.stream)
            await nc.publish(subjects.replica_ready(cfg.replica_id), codec.encode(Ack(message=cfg.replica_id)))
            await nc.flush()
            log.info("worker of queue %s ready (replica %s)", self.queue, cfg.replica_id)
            while not self.stopping.is_set():
                await self._slots.acquire()
                free = 1
                while free < cfg.concurrency and not self._slots.locked():
                    await self._slots.acquire()
                    free += 1
                msgs: list[Msg] = []
                try:
                    msgs = await sub.fetch(free, timeout=FETCH_TIMEOUT_S)
                except (TimeoutError, nats.errors.TimeoutError):
                    pass
                except Exception as exc:
                    if self.stopping.is_set():
                        pass
                    else:
                        log.warning("pull from queue %s failed: %s: %s", self.queue, type(exc).__name__, exc)
                        await asyncio.sleep(RECONNECT_PAUSE_S)
                for _ in range(free - len(msgs)):
                    self._slots.release()
                for msg in msgs:
                    task = asyncio.create_task(self._run_one(msg))
                    self._tasks.add(task)
                    task.add_done_callback(self._tasks.discard)
            if self._tasks:
                await asyncio.gather(*list(self._tasks), return_exceptions=True)
        finally:
            # Flush (the last acks), then close: a drain can wait on the pull subscription's inbox for long.
            with contextlib.suppress(Exception):
                await nc.flush(timeout=int(CLOSE_TIMEOUT_S))
            with contextlib.suppress(Exception):
                await asyncio.wait_for(nc.close(), CLOSE_TIMEOUT_S)

    async def _run_one(self, msg: Msg) -> None:
        try:
            await self.handle(msg)
        except Exception:
            log.exception("job of queue %s could not be settled (it comes back after ack_wait)", self.queue)
        finally:
            self._slots.release()

    async def handle(self, msg: Msg) -> None:
        """Run one job; ack it, nak it with a delay, or dead-letter it."""
        job_id = job_id_of(msg)
        attempt = int(msg.metadata.num_delivered or 1)
        token = _current_job.set(job_id)
        try:
            await self._call(decode_job(msg.data))
        except Exception as exc:
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
            return
        finally:
            _current_job.reset(token)
        await msg.ack()

    async def _call(self, job: Any) -> Any:
        f = self.target.raw_f
        timeout = self.config.timeout_s
        if inspect.iscoroutinefunction(f):
            return await asyncio.wait_for(f(job), timeout)
        # to_thread copies the context: the function sees current_job_id() in its thread too.
        return await asyncio.wait_for(asyncio.to_thread(f, job), timeout)

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


async def serve(config: RuntimeConfig, target: Target) -> None:
    """Run ``target``'s queue until SIGTERM/SIGINT, then finish the jobs in flight."""
    worker = QueueWorker(config, target)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, worker.stop)
    await worker.run()

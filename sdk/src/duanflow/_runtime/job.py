"""The one-shot runtime mode of an ``@app.job`` replica: run exactly one input, report, exit.

The agent starts it with ``DUANFLOW_JOB_ID`` and the job's own durable consumer (``subjects.job_consumer``), which
holds that one invocation. The replica reports ``running`` on ``subjects.job_event(job_id)``, runs the function
under its timeout (the same execution path as every other replica), stores the Result in the results bucket
under the job id (what ``Job.get()`` reads), reports ``succeeded`` / ``failed`` / ``timed_out``, acks and
exits 0. SIGTERM (the job was cancelled) ends it at once: the process exits without waiting for the function.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from typing import Any, Final

import msgspec
import nats
import nats.errors
from duanflow_proto import codec, subjects
from duanflow_proto.errors import DuanFlowError, InvalidInputError
from duanflow_proto.messages.common import Ack
from duanflow_proto.messages.invocation import Invocation, Result
from duanflow_proto.messages.jobs import FAILED, RUNNING, SUCCEEDED, TIMED_OUT, JobEvent

from duanflow._payload import fetch as fetch_payload
from duanflow._runtime.config import RuntimeConfig
from duanflow._runtime.worker import Target, Worker

log = logging.getLogger("duanflow.runtime.job")

FETCH_TIMEOUT_S: Final = 1.0
CONNECT_TIMEOUT_S: Final = 15.0
IN_PROGRESS_S: Final = 10.0
"""How often a running job tells JetStream its input is still in progress."""


def outcome(result: Result) -> str:
    """The job state a Result ends the job in."""
    if result.ok:
        return SUCCEEDED
    if result.error is not None and result.error.code == "function_timeout":
        return TIMED_OUT
    return FAILED


async def serve_job(config: RuntimeConfig, target: Target) -> None:
    """Pull the job's one invocation, run it, report how it ended; return early on SIGTERM."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    worker = Worker(config, target)
    nc = await asyncio.wait_for(
        nats.connect(
            servers=[config.nats_url],
            user=config.nats_user or None,
            password=config.nats_password or None,
            name=f"duanflow-job-{config.replica_id}",
            max_reconnect_attempts=-1,
            reconnect_time_wait=0.5,
        ),
        CONNECT_TIMEOUT_S,
    )
    worker._nc = nc
    worker._js = js = nc.jetstream()
    try:
        sub = await js.pull_subscribe_bind(durable=config.consumer, stream=config.stream)
        await nc.publish(subjects.replica_ready(config.replica_id), codec.encode(Ack(message=config.replica_id)))
        await nc.flush()
        log.info("job replica %s ready: %s of %s.%s", config.replica_id, config.job_id, config.app, config.function)
        msg = None
        while msg is None and not stop.is_set():
            try:
                got = await sub.fetch(1, timeout=FETCH_TIMEOUT_S)
            except (TimeoutError, nats.errors.TimeoutError):
                continue
            msg = got[0] if got else None
        if msg is None:
            log.info("job %s: stopped before it started", config.job_id)
            return
        run = asyncio.ensure_future(_run(worker, nc, msg, config))
        stopped = asyncio.ensure_future(stop.wait())
        done, _ = await asyncio.wait({run, stopped}, return_when=asyncio.FIRST_COMPLETED)
        if run not in done:
            log.warning("job %s: stopped while running (cancelled)", config.job_id)
            run.cancel()
            return
        stopped.cancel()
        run.result()
    finally:
        with contextlib.suppress(Exception):
            await nc.flush(timeout=5)
        with contextlib.suppress(Exception):
            await nc.close()


async def _report(nc: Any, config: RuntimeConfig, state: str, error: str = "", tb: str = "") -> None:
    event = JobEvent(
        job_id=config.job_id,
        replica_id=config.replica_id,
        state=state,
        ts_ms=time.time_ns() // 1_000_000,
        error=error,
        traceback=tb,
    )
    try:
        await nc.publish(subjects.job_event(config.job_id), codec.encode(event))
        await nc.flush(timeout=5)
    except Exception as exc:  # the router also finds the result in the results bucket
        log.warning("could not report job %s %s: %s", config.job_id, state, exc)


async def _beat(msg: Any) -> None:
    while True:
        await asyncio.sleep(IN_PROGRESS_S)
        with contextlib.suppress(Exception):
            await msg.in_progress()


async def _run(worker: Worker, nc: Any, msg: Any, config: RuntimeConfig) -> None:
    started = time.monotonic()
    try:
        inv = codec.decode(msg.data, Invocation)
        if inv.payload_ref:
            inv = msgspec.structs.replace(inv, args=await fetch_payload(nc, inv.payload_ref), payload_ref=None)
        args, kwargs = worker._arguments(inv)
    except DuanFlowError as exc:
        call_id = inv.call_id if "inv" in locals() else config.job_id
        result = Result(call_id=call_id, ok=False, error=exc.to_reply(), replica_id=config.replica_id)
        await worker._keep(config.job_id, result)
        await _report(nc, config, FAILED, exc.message)
        await msg.term()
        return
    if inv.call_id != config.job_id:
        raise InvalidInputError(f"job replica of {config.job_id} got the input of {inv.call_id}")
    await _report(nc, config, RUNNING)
    beat = asyncio.ensure_future(_beat(msg))
    try:
        result = await worker._execute(inv, args, kwargs, started)
    finally:
        beat.cancel()
    state = outcome(result)
    await worker._keep(config.job_id, result)
    err = result.error
    await _report(nc, config, state, err.message if err else "", (err.traceback or "") if err else "")
    print(f"duanflow: job {config.job_id} {state} in {time.monotonic() - started:.1f}s", flush=True)
    with contextlib.suppress(Exception):
        await msg.ack()

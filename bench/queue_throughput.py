"""Jobs per second through a ``df.Queue`` and an ``@app.worker``, beside Celery + Redis measured in the same run.

``python bench/queue.py [--jobs 50000] [--replicas 1]`` (which runs this file) starts a NATS server, the queue's
consumer (as the router creates it) and the worker's replicas directly (``bench/_direct.py``: no router, agent,
Postgres or S3), then times ``queue.put_many(jobs)`` → every job run by the worker and acked (the queue empty:
``len(queue) == 0``), end to end. The handler is tiny (it returns at once). The peer: the same tiny handler as a
Celery task (acks late, as durable as the queue) with a worker in a subprocess on the same machine and a private
``redis-server`` as the broker, timed from the first ``apply_async`` until the broker holds no task, neither waiting
nor unacked.

One JSON line per figure on stdout (``{"bench": ..., "metric": ..., "value": ..., "unit": ...}``), ratios last; a
peer that cannot run here prints one ``skipped`` line saying why.
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from _direct import direct  # type: ignore[import-not-found,unused-ignore]
from _peers import PeerUnavailable, celery_app, redis_server  # type: ignore[import-not-found,unused-ignore]
from remote_latency import emit, note, skipped  # type: ignore[import-not-found,unused-ignore]

APP = "bench-queue"
QUEUE = "bench-jobs"
APP_SOURCE = f'''
"""A tiny worker for bench/queue.py."""

import duanflow as df

app = df.App("{APP}")
jobs = df.Queue("{QUEUE}", max_retries=3)


@app.worker(queue=jobs, timeout=60, concurrency={{concurrency}})
def handle(job):
    return None
'''
DRAIN_TIMEOUT_S = 300.0
POLL_S = 0.005


def wait_empty(depth: Any, what: str) -> None:
    """Poll ``depth()`` until it is 0."""
    deadline = time.monotonic() + DRAIN_TIMEOUT_S
    while depth() > 0:
        if time.monotonic() > deadline:
            raise SystemExit(f"{what}: {depth()} jobs still not done after {DRAIN_TIMEOUT_S:.0f}s")
        time.sleep(POLL_S)


def bench_duanflow(queue: Any, n: int) -> float:
    """Jobs/s: ``put_many`` of ``n`` tiny jobs until the worker acked the last one."""
    jobs = [{"n": i} for i in range(n)]
    start = time.perf_counter()
    queue.put_many(jobs)
    put_s = time.perf_counter() - start
    wait_empty(lambda: len(queue), "duanflow queue")
    elapsed = time.perf_counter() - start
    note(f"duanflow: {n} jobs put in {put_s:.2f}s, all done after {elapsed:.2f}s")
    return n / elapsed


def bench_celery(n: int) -> float | None:
    """Jobs/s of the same tiny handler through Celery with Redis (a private server), or None when skipped."""
    try:
        with redis_server() as url, celery_app(url, backend=url, acks_late=True) as module:
            r = importlib.import_module("redis").Redis.from_url(url)

            def depth() -> int:
                return int(r.llen("celery")) + int(r.hlen("unacked"))

            handle = module.handle
            for i in range(200):  # warm: connections, the worker's prefetch
                handle.apply_async(({"n": i},))
            wait_empty(depth, "celery warm-up")
            note(f"celery: {n} jobs")
            start = time.perf_counter()
            for i in range(n):
                handle.apply_async(({"n": i},))
            put_s = time.perf_counter() - start
            wait_empty(depth, "celery")
            elapsed = time.perf_counter() - start
            note(f"celery: {n} jobs sent in {put_s:.2f}s, all done after {elapsed:.2f}s")
            return n / elapsed
    except PeerUnavailable as exc:
        skipped("celery_redis_queue", str(exc))
    except Exception as exc:  # a peer's failure never ends the bench
        skipped("celery_redis_queue", f"{type(exc).__name__}: {exc}")
    return None


def main(argv: list[str] | None = None) -> int:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=50_000, help="jobs per timed round")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds (the median and best are reported)")
    parser.add_argument("--replicas", type=int, default=1, help="worker replicas")
    parser.add_argument("--concurrency", type=int, default=1, help="the worker's concurrency=")
    parser.add_argument("--celery-jobs", type=int, default=10_000, help="jobs through Celery")
    args = parser.parse_args(argv)
    if min(args.jobs, args.rounds, args.replicas, args.concurrency, args.celery_jobs) < 1:
        parser.error("every count must be positive")
    with direct(APP_SOURCE.format(concurrency=args.concurrency), APP) as d:
        for _ in range(args.replicas):
            d.start_replica("handle")
        queue = d.module.jobs
        bench_duanflow(queue, 1000)  # warm: the connection, the worker's pulls
        rates = [bench_duanflow(queue, args.jobs) for _ in range(args.rounds)]
    ours = statistics.median(rates)
    emit("duanflow_queue", "throughput_median", round(ours, 1), "jobs/s", jobs=str(args.jobs))
    emit("duanflow_queue", "throughput_best", round(max(rates), 1), "jobs/s", replicas=str(args.replicas))
    celery = bench_celery(args.celery_jobs)
    if celery:
        emit("celery_redis_queue", "throughput", round(celery, 1), "jobs/s", jobs=str(args.celery_jobs))
        emit("duanflow_queue", "throughput_ratio_to_celery_redis_queue", round(ours / celery, 2), "x")
    return 0


if __name__ == "__main__":
    sys.exit(main())

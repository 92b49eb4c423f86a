"""Durability of a ``df.Queue``: every job completes while worker replicas are killed (``kill -9``) during the drain
and the NATS server restarts once (file storage) — counted per job id.

``python bench/queue_durability.py [--jobs 10000]``: NATS, the queue's consumer (lease ``--ack-wait`` seconds, so a
killed replica's jobs come back soon) and ``--replicas`` worker replicas started directly (``bench/_direct.py``).
The worker records each successful completion under the stable job id it sees (``df.current_job_id()``), one line
per completion in a file per replica. While the queue drains: a replica is killed and replaced, the NATS server
restarts, another replica is killed and replaced. Then it prints the counts (jobs, completed once, completed more
than once, extra runs, missing) as JSON lines and exits 1 when a job is missing. Running twice is allowed (a job
whose ack was lost to a kill or a restart runs again; the function deduplicates on the job id); missing never.
"""

from __future__ import annotations

import argparse
import collections
import functools
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from _direct import Direct, direct, kill_9, restart_nats  # type: ignore[import-not-found,unused-ignore]
from remote_latency import emit, note  # type: ignore[import-not-found,unused-ignore]

APP = "bench-queue-durable"
APP_SOURCE = f'''
"""A worker for bench/queue_durability.py: each job takes about {{job_ms}} ms and records its completion."""

import os
import time

import duanflow as df

app = df.App("{APP}")
jobs = df.Queue("durable-jobs", max_retries=3)
_fd = None


@app.worker(queue=jobs, timeout=30, concurrency={{concurrency}})
def record(job):
    global _fd
    time.sleep({{job_ms}} / 1000)
    if _fd is None:
        marks = os.path.join(os.environ["BENCH_QUEUE_MARKS"], os.environ["DUANFLOW_REPLICA_ID"])
        _fd = os.open(marks, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.write(_fd, (df.current_job_id() + "\\n").encode())
'''
DRAIN_TIMEOUT_S = 600.0


def completions(marks: Path) -> collections.Counter[str]:
    """Successful completions per job id, from every replica's file (a line cut by a kill is not one)."""
    counts: collections.Counter[str] = collections.Counter()
    for path in marks.iterdir():
        data = path.read_bytes()
        lines = data.split(b"\n")
        counts.update(line.decode() for line in lines[:-1] if line)  # the last piece has no newline yet
    return counts


def reached(marks: Path, count: int) -> bool:
    """Whether ``count`` jobs completed at least once."""
    return len(completions(marks)) >= count


def wait_for(condition: Any, timeout: float, what: str) -> None:
    """Poll ``condition()`` until true."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.05)


def main(argv: list[str] | None = None) -> int:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=10_000, help="jobs put on the queue")
    parser.add_argument("--replicas", type=int, default=2, help="worker replicas running at once")
    parser.add_argument("--concurrency", type=int, default=4, help="the worker's concurrency=")
    parser.add_argument("--job-ms", type=float, default=2.0, help="how long each job takes")
    parser.add_argument("--ack-wait", type=float, default=3.0, help="the consumer's lease, seconds")
    args = parser.parse_args(argv)
    source = APP_SOURCE.format(job_ms=args.job_ms, concurrency=args.concurrency)
    marks = Path(os.environ.get("TMPDIR", "/tmp")) / f"duanflow-bench-queue-marks-{os.getpid()}"
    marks.mkdir(parents=True, exist_ok=True)
    os.environ["BENCH_QUEUE_MARKS"] = str(marks)
    try:
        with direct(source, APP, ack_wait=args.ack_wait) as d:
            return drain(d, args.jobs, args.replicas, marks)
    finally:
        for path in marks.iterdir():
            path.unlink()
        marks.rmdir()


def drain(d: Direct, n: int, replicas: int, marks: Path) -> int:
    """Put ``n`` jobs, disrupt the drain, count the completions."""
    running = [d.start_replica("record") for _ in range(replicas)]
    queue = d.module.jobs
    started = time.perf_counter()
    ids = queue.put_many([{"n": i} for i in range(n)])
    note(f"{n} jobs put in {time.perf_counter() - started:.2f}s; draining with {replicas} replicas")

    def done() -> int:
        return len(completions(marks))

    kills = restarts = 0
    for fraction, disruption in ((0.15, "kill"), (0.35, "restart"), (0.6, "kill")):
        wait_for(functools.partial(reached, marks, int(fraction * n)), DRAIN_TIMEOUT_S, f"{fraction:.0%} of the jobs")
        if disruption == "kill":
            victim = running.pop(0)
            note(f"kill -9 of replica pid {victim.pid} at {done()} jobs done")
            kill_9(victim)
            kills += 1
            # the replacement starts while the others drain (as the autoscaler would start one)
            threading.Thread(target=lambda: running.append(d.start_replica("record")), daemon=True).start()
        else:
            note(f"NATS server restart at {done()} jobs done")
            restart_nats(d)
            restarts += 1
    expected = set(ids)
    wait_for(lambda: expected <= completions(marks).keys(), DRAIN_TIMEOUT_S, "every job to complete")
    elapsed = time.perf_counter() - started
    wait_for(lambda: len(queue) == 0, 60, "the queue to be empty (every job acked)")
    counts = completions(marks)
    once = sum(1 for j in ids if counts[j] == 1)
    more = sum(1 for j in ids if counts[j] > 1)
    missing = sum(1 for j in ids if counts[j] == 0)
    extra = sum(counts[j] - 1 for j in ids if counts[j] > 1)
    unknown = sum(1 for j in counts if j not in expected)
    emit("queue_durability", "jobs", n, "jobs", kills=str(kills), nats_restarts=str(restarts))
    emit("queue_durability", "completed_once", once, "jobs")
    emit("queue_durability", "completed_more_than_once", more, "jobs", extra_runs=str(extra))
    emit("queue_durability", "missing", missing, "jobs", unknown_ids=str(unknown))
    emit("queue_durability", "drain_time", round(elapsed, 2), "s")
    return 1 if missing or unknown else 0


if __name__ == "__main__":
    sys.exit(main())

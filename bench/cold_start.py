"""Cold start: no replica → first result, with the code already on the machine (process runtime).

``python bench/cold_start.py [--runs 7]``: for each run, a call is made while its function has no replica, then a
replica is started exactly as an agent starts one (``python -m duanflow._runtime`` with the contract's env,
bundle already extracted) — ``spawn``: a fresh interpreter; ``zygote``: forked from a pre-loaded
``python -m duanflow._runtime.zygote`` — and the figure is the time from that start to the call's result, with
its part until the replica announced readiness (imports, user module, NATS connect, consumer bind).
The router's placement decision (scale from zero) is not part of it: see the closing note of
issue 3. The NATS request/reply floor is measured in the same run. One JSON line per figure on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from _direct import direct  # type: ignore[import-not-found,unused-ignore]
from remote_latency import bench_nats_floor, emit, note, skipped  # type: ignore[import-not-found,unused-ignore]

APP = "bench-cold"
APP_SOURCE = f'''
"""A trivial app for bench/cold_start.py."""

import duanflow as df

app = df.App("{APP}")


@app.function(timeout=60)
def hello(x):
    return f"hello {{x}}"
'''


class Zygote:
    """``python -m duanflow._runtime.zygote``: imports once, forks a replica per request."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "duanflow._runtime.zygote"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        assert self.proc.stdout is not None
        if not json.loads(self.proc.stdout.readline()).get("ready"):
            raise SystemExit("the zygote did not start")

    def start(self, d: Any, function: str) -> int:
        """Fork a replica of ``function``; its pid."""
        replica_id = f"rp-{uuid.uuid4().hex[:10]}"
        request = {
            "env": d.replica_env(function, replica_id),
            "cwd": str(d.root / "app"),
            "log": str(d.root / f"{function}-{replica_id}.log"),
        }
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        return int(json.loads(self.proc.stdout.readline())["pid"])

    def close(self) -> None:
        """Stop forking (the children were stopped by the caller)."""
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(10)


def one_run(d: Any, fn: Any, zygote: Zygote | None) -> tuple[float, float]:
    """(start → ready, start → first result) of one cold start, in seconds."""

    async def go() -> tuple[float, float]:
        handle = await fn.spawn.aio("cold")
        started = time.perf_counter()
        if zygote is None:
            proc = await asyncio.to_thread(d.start_replica, "hello", wait=False)
            pid = proc.pid
        else:
            pid = zygote.start(d, "hello")
        ready_at: list[float] = []

        async def watch_ready() -> None:
            # The replica logs its readiness line once it pulls; poll the log cheaply.
            while not ready_at:
                if b"ready:" in b"".join(p.read_bytes() for p in d.root.glob("hello-*.log")):
                    ready_at.append(time.perf_counter())
                await asyncio.sleep(0.002)

        watcher = asyncio.create_task(watch_ready())
        value = await handle.get.aio(timeout=60)
        done = time.perf_counter()
        watcher.cancel()
        if value != "hello cold":
            raise SystemExit(f"unexpected result {value!r}")
        os.kill(pid, signal.SIGTERM)
        if zygote is None:
            await asyncio.to_thread(proc.wait, 30)
        return (ready_at[0] if ready_at else done) - started, done - started

    return asyncio.run(go())


def measure(d: Any, runs: int, zygote: Zygote | None, bench: str) -> None:
    """Median figures over ``runs`` cold starts."""
    readies, firsts = [], []
    for i in range(runs):
        for path in d.root.glob("hello-*.log"):
            path.unlink()
        ready, first = one_run(d, d.module.hello, zygote)
        note(f"{bench} {i + 1}: ready after {ready * 1e3:.0f} ms, first result after {first * 1e3:.0f} ms")
        readies.append(ready * 1e3)
        firsts.append(first * 1e3)
    emit(bench, "replica_ready_median", round(statistics.median(readies), 1), "ms")
    emit(bench, "first_result_median", round(statistics.median(firsts), 1), "ms")
    emit(bench, "first_result_max", round(max(firsts), 1), "ms", runs=str(runs))


def main(argv: list[str] | None = None) -> int:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=7, help="cold starts measured")
    args = parser.parse_args(argv)
    with direct(APP_SOURCE, APP) as d:
        asyncio.run(bench_nats_floor(d.login, 200, 50, 2000, 64))
        measure(d, args.runs, None, "duanflow_cold_start_spawn")
        zygote = Zygote()
        try:
            measure(d, args.runs, zygote, "duanflow_cold_start_zygote")
        finally:
            zygote.close()
    skipped("ray", "cold start of a Ray worker is not comparable without a Ray cluster here")
    return 0


if __name__ == "__main__":
    sys.exit(main())

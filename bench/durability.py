"""Durability of ``.map()``: every result arrives, correct, in order, none twice — while a replica is killed
(``kill -9``) and while the NATS server restarts (file storage), each during a map over 10,000 inputs.

``python bench/durability.py [--inputs 10000]``: NATS, the consumer (lease ``--ack-wait`` seconds; replicas
heartbeat long inputs) and two replicas started directly (``bench/_direct.py``). Prints one JSON line per
scenario with the elapsed time and whether every result was right; exits 1 when one was not.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from _direct import direct, kill_9, restart_nats  # type: ignore[import-not-found,unused-ignore]
from remote_latency import emit, note  # type: ignore[import-not-found,unused-ignore]

APP = "bench-durable"
APP_SOURCE = f'''
"""A small app for bench/durability.py: each input takes about a millisecond."""

import time

import duanflow as df

app = df.App("{APP}")


@app.function(timeout=30)
def square(x):
    time.sleep(0.001)
    return x * x
'''


def run_map(fn: Any, n: int, at: int, disrupt: Any) -> tuple[bool, float, str]:
    """Map over ``n`` inputs, calling ``disrupt()`` once ``at`` results are in; (all correct, seconds, detail)."""
    started = time.perf_counter()
    got: list[int] = []
    for i, value in enumerate(fn.map(range(n))):
        got.append(value)
        if i == at:
            threading.Thread(target=disrupt, daemon=True).start()
    elapsed = time.perf_counter() - started
    ok = got == [x * x for x in range(n)]
    detail = "" if ok else f"{len(got)} results, first wrong at {next(i for i, v in enumerate(got) if v != i * i)}"
    return ok, elapsed, detail


def main(argv: list[str] | None = None) -> int:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--inputs", type=int, default=10_000, help="inputs per map")
    parser.add_argument("--ack-wait", type=float, default=3.0, help="the consumer's lease, seconds")
    args = parser.parse_args(argv)
    failures = 0
    with direct(APP_SOURCE, APP, ack_wait=args.ack_wait) as d:
        victim = d.start_replica("square")
        d.start_replica("square")
        fn = d.module.square
        note(f"kill -9 of a replica during a map over {args.inputs} inputs")
        ok, elapsed, detail = run_map(fn, args.inputs, args.inputs // 5, lambda: kill_9(victim))
        emit(
            "durability",
            "kill_9_replica_mid_map",
            round(elapsed, 2),
            "s",
            all_results_once_in_order=str(ok),
            detail=detail,
        )
        failures += not ok
        d.start_replica("square")
        note(f"NATS server restart during a map over {args.inputs} inputs")
        ok, elapsed, detail = run_map(fn, args.inputs, args.inputs // 5, lambda: restart_nats(d))
        emit(
            "durability",
            "nats_restart_mid_map",
            round(elapsed, 2),
            "s",
            all_results_once_in_order=str(ok),
            detail=detail,
        )
        failures += not ok
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

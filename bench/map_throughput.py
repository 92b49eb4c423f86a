"""``f.map()`` throughput over many tiny inputs, next to the NATS request/reply floor measured in the same run.

``python bench/map_throughput.py [--inputs 100000] [--replicas 1]`` starts a NATS server, the function's
consumer and its replicas directly (``bench/_direct.py``: no router, agent, Postgres or S3 — the invocation path
only), then maps a trivial function over ``--inputs`` integers and checks every result. Peers (Ray, Celery) are
measured where importable, else one line says why not. One JSON line per figure on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _direct import direct  # type: ignore[import-not-found,unused-ignore]
from remote_latency import (  # type: ignore[import-not-found,unused-ignore]
    bench_nats_floor,
    emit,
    note,
    skipped,
)

APP = "bench-map"
APP_SOURCE = f'''
"""A trivial app for bench/map_throughput.py."""

import duanflow as df

app = df.App("{APP}")


@app.function(timeout=60)
def inc(x):
    return x + 1
'''


def bench_map(fn: object, n: int) -> float:
    """Results per second of ``fn.map(range(n))`` (every result checked)."""
    start = time.perf_counter()
    total = 0
    expected = 1
    for value in fn.map(range(n)):  # type: ignore[attr-defined]
        if value != expected:
            raise SystemExit(f"result {expected - 1} is {value!r}, expected {expected}")
        expected += 1
        total += 1
    elapsed = time.perf_counter() - start
    if total != n:
        raise SystemExit(f"{total} results for {n} inputs")
    return n / elapsed


def bench_ray_map(n: int) -> None:
    """Ray: ``ray.get([f.remote(x) for x in range(n)])``."""
    try:
        ray = importlib.import_module("ray")
    except ImportError:
        skipped("ray", "ray is not installed (pip install ray to compare)")
        return
    ray.init(include_dashboard=False, logging_level="ERROR")
    try:
        inc = ray.remote(lambda x: x + 1)
        start = time.perf_counter()
        ray.get([inc.remote(x) for x in range(n)])
        emit("ray_map", "throughput", round(n / (time.perf_counter() - start), 1), "results/s")
    finally:
        ray.shutdown()


def main(argv: list[str] | None = None) -> int:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--inputs", type=int, default=100_000, help="inputs mapped")
    parser.add_argument("--replicas", type=int, default=1, help="replicas of the function")
    parser.add_argument("--rounds", type=int, default=2, help="timed maps (the best is reported too)")
    args = parser.parse_args(argv)
    with direct(APP_SOURCE, APP) as d:
        for _ in range(args.replicas):
            d.start_replica("inc")
        asyncio.run(bench_nats_floor(d.login, 200, 50, 20_000, 64))
        fn = d.module.inc
        bench_map(fn, 1000)  # warm: connection, lookup, batch size
        rates = []
        for i in range(args.rounds):
            note(f"map over {args.inputs} inputs, round {i + 1}")
            rates.append(bench_map(fn, args.inputs))
        emit("duanflow_map", "throughput_median", round(sorted(rates)[len(rates) // 2], 1), "results/s")
        emit("duanflow_map", "throughput_best", round(max(rates), 1), "results/s", inputs=str(args.inputs))
    bench_ray_map(args.inputs)
    try:
        importlib.import_module("celery")
    except ImportError:
        skipped("celery", "celery is not installed (pip install celery to compare)")
    else:
        skipped("celery", "map over Celery needs a broker: run bench/remote_latency.py --celery-broker")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``f.map()`` throughput over many tiny inputs, next to the NATS request/reply floor measured in the same run.

``python bench/map_throughput.py [--inputs 100000] [--replicas 1]`` starts a NATS server, the function's
consumer and its replicas directly (``bench/_direct.py``: no router, agent, Postgres or S3 — the invocation path
only), then maps a trivial function over ``--inputs`` integers and checks every result. The peers, in the same run
(``bench/_peers.py``): Ray (local, 2 CPUs) and Celery with a private redis-server, each mapping the same function
over the same inputs for at most ``--peer-budget`` seconds; a peer that cannot run here gets one ``skipped`` line
saying why. One JSON line per figure on stdout, the ratios to each peer last.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from _direct import direct  # type: ignore[import-not-found,unused-ignore]
from _peers import PeerUnavailable, celery_app, ray_local, redis_server  # type: ignore[import-not-found,unused-ignore]
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


def peer_map(bench: str, n: int, chunk: int, budget_s: float, run_chunk: Callable[[range], list[Any]]) -> float | None:
    """Results/s of a peer mapping ``x + 1`` over ``range(n)`` in chunks (each checked), stopping after ``budget_s``.

    None (with a ``skipped`` line saying why) when the peer cannot run here.
    """
    start = time.perf_counter()
    done = 0
    while done < n and (done == 0 or time.perf_counter() - start < budget_s):
        xs = range(done, min(n, done + chunk))
        values = run_chunk(xs)
        if list(values) != [x + 1 for x in xs]:
            raise SystemExit(f"{bench}: wrong results for inputs {xs.start}..{xs.stop - 1}")
        done += len(xs)
    rate = done / (time.perf_counter() - start)
    emit(bench, "throughput", round(rate, 1), "results/s", inputs=str(done), of=str(n))
    return rate


def bench_ray_map(n: int, budget_s: float) -> float | None:
    """Ray: ``ray.get([inc.remote(x) for x in chunk])`` on a local Ray instance (2 CPUs)."""
    try:
        with ray_local() as ray:
            inc = ray.remote(lambda x: x + 1)
            ray.get([inc.remote(x) for x in range(100)])  # warm: the workers are up
            note(f"Ray: map over up to {n} inputs (at most ~{budget_s:g}s)")
            return peer_map("ray_map", n, 10_000, budget_s, lambda xs: ray.get([inc.remote(x) for x in xs]))
    except PeerUnavailable as exc:
        skipped("ray_map", str(exc))
    except Exception as exc:  # a peer's failure never ends the bench
        skipped("ray_map", f"{type(exc).__name__}: {exc}")
    return None


def bench_celery_map(n: int, budget_s: float) -> float | None:
    """Celery + Redis (a private server; prefork worker, 2 processes): ``delay(x)`` per input, joined per chunk."""
    try:
        with redis_server() as url, celery_app(url, backend=url) as module:
            result_set = importlib.import_module("celery.result").ResultSet

            inc = module.inc

            def run_chunk(xs: range) -> list[Any]:
                return list(result_set([inc.delay(x) for x in xs]).join_native(timeout=300))

            run_chunk(range(100))  # warm
            note(f"Celery: map over up to {n} inputs (at most ~{budget_s:g}s)")
            return peer_map("celery_map", n, 2_000, budget_s, run_chunk)
    except PeerUnavailable as exc:
        skipped("celery_map", str(exc))
    except Exception as exc:  # a peer's failure never ends the bench
        skipped("celery_map", f"{type(exc).__name__}: {exc}")
    return None


def main(argv: list[str] | None = None) -> int:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--inputs", type=int, default=100_000, help="inputs mapped")
    parser.add_argument("--replicas", type=int, default=1, help="replicas of the function")
    parser.add_argument("--rounds", type=int, default=2, help="timed maps (the best is reported too)")
    parser.add_argument("--peer-budget", type=float, default=30.0, help="seconds each peer maps for, at most")
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
        ours = sorted(rates)[len(rates) // 2]
        emit("duanflow_map", "throughput_median", round(ours, 1), "results/s")
        emit("duanflow_map", "throughput_best", round(max(rates), 1), "results/s", inputs=str(args.inputs))
    peers = {"ray_map": bench_ray_map(args.inputs, args.peer_budget)}
    peers["celery_map"] = bench_celery_map(args.inputs, args.peer_budget)
    for peer, rate in peers.items():
        if rate:
            emit("duanflow_map", f"throughput_ratio_to_{peer}", round(ours / rate, 2), "x")
    return 0


if __name__ == "__main__":
    sys.exit(main())

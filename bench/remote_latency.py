"""Warm ``.remote()`` latency and throughput on the local stack, next to the raw NATS request/reply floor.

In one run (``make bench``, or ``python bench/remote_latency.py [--use-running]``):

1. starts a local stack in a temporary ``DUANFLOW_HOME`` (``duanflow dev up --detach``), or with ``--use-running``
   uses the one already running (its data dir: ``--data-dir``, default ``$DUANFLOW_HOME/local``);
2. the floor: a trivial NATS responder in a separate process, and nats-py requests to it over the stack's own
   NATS server (sequential: median and p99; ``--inflight`` at once: calls/s);
3. deploys a trivial function with ``duanflow deploy`` and measures warm ``.remote()`` the same way (sequential
   through the sync facade, which drives its own connection (the sync lane), then the same calls through the
   client's background thread as ``duanflow_remote_threaded``; ``--inflight`` concurrent calls through
   ``.remote.aio()``);
4. the peers, measured the same way (``bench/_peers.py``): Ray (local, 2 CPUs) and Celery with a private
   ``redis-server`` as broker and backend (or ``--celery-broker``); a peer that cannot run here gets one line
   saying why it was skipped.

Every figure is one JSON line on stdout: ``{"bench": ..., "metric": ..., "value": ..., "unit": ...}``; progress
goes to stderr. A stack this script started is stopped again, whatever happens.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import nats
from duanflow_proto.messages.invocation import HDR_REPLY

BENCH_APP = "bench-latency"
BENCH_FUNCTION = "echo"
PAYLOAD = "ping"
APP_SOURCE = textwrap.dedent(
    f'''
    """A trivial app for bench/remote_latency.py: the function returns its argument."""

    import duanflow as df

    app = df.App("{BENCH_APP}")


    @app.function(timeout=60)
    def {BENCH_FUNCTION}(x):
        return x
    '''
)
ENV_RESPONDER = "DUANFLOW_BENCH_RESPONDER"


def emit(bench: str, metric: str, value: float | None, unit: str | None, **extra: str) -> None:
    """Print one figure as a JSON line."""
    print(json.dumps({"bench": bench, "metric": metric, "value": value, "unit": unit, **extra}), flush=True)


def note(message: str) -> None:
    """Progress, on stderr so stdout stays JSON lines."""
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def p99(samples: list[float]) -> float:
    """The 99th percentile (nearest rank)."""
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, max(0, round(0.99 * len(ordered)) - 1))]


MEDIANS: dict[str, float] = {}
"""Sequential medians by bench name, for the ratios printed at the end."""


def report_sequential(bench: str, samples_s: list[float]) -> None:
    """Median and p99 of sequential call latencies, in microseconds."""
    us = [s * 1e6 for s in samples_s]
    MEDIANS[bench] = statistics.median(us)
    emit(bench, "sequential_median", round(statistics.median(us), 1), "us")
    emit(bench, "sequential_p99", round(p99(us), 1), "us")


def report_throughput(bench: str, inflight: int, calls_per_s: float) -> None:
    """Calls per second with ``inflight`` calls outstanding."""
    emit(bench, f"throughput_{inflight}_inflight", round(calls_per_s, 1), "calls/s")


def time_sequential(call: Callable[[], object], n: int, warmup: int) -> list[float]:
    """Latency of ``n`` calls made one after another (after ``warmup`` untimed ones)."""
    for _ in range(warmup):
        call()
    samples = []
    for _ in range(n):
        start = time.perf_counter()
        call()
        samples.append(time.perf_counter() - start)
    return samples


async def time_sequential_async(call: Callable[[], Awaitable[object]], n: int, warmup: int) -> list[float]:
    """:func:`time_sequential` for coroutines."""
    for _ in range(warmup):
        await call()
    samples = []
    for _ in range(n):
        start = time.perf_counter()
        await call()
        samples.append(time.perf_counter() - start)
    return samples


async def throughput_async(call: Callable[[], Awaitable[object]], total: int, inflight: int) -> float:
    """Calls per second with ``inflight`` calls outstanding at all times, over ``total`` calls."""
    remaining = total

    async def lane() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            await call()

    start = time.perf_counter()
    async with asyncio.TaskGroup() as tg:
        for _ in range(inflight):
            tg.create_task(lane())
    return total / (time.perf_counter() - start)


# --------------------------------------------------------------------------- the local stack


def duanflow_cli() -> str:
    """The ``duanflow`` command of this interpreter's environment."""
    beside = Path(sys.executable).parent / "duanflow"
    found = str(beside) if beside.exists() else shutil.which("duanflow")
    if not found:
        raise SystemExit("the duanflow CLI is not installed: run `make install`")
    return found


def cli(*args: str, timeout_s: float = 300.0) -> None:
    """Run the CLI with its output on stderr; a failure or a hang past ``timeout_s`` ends the bench."""
    try:
        proc = subprocess.run(
            [duanflow_cli(), *args], stdout=sys.stderr, stderr=sys.stderr, check=False, timeout=timeout_s
        )
    except subprocess.TimeoutExpired:
        raise SystemExit(f"`duanflow {' '.join(args)}` did not finish within {timeout_s:.0f}s") from None
    if proc.returncode != 0:
        raise SystemExit(f"`duanflow {' '.join(args)}` failed with exit code {proc.returncode}")


@contextlib.contextmanager
def local_stack(use_running: bool, data_dir: Path | None) -> Iterator[Path]:
    """The data dir of a running local stack: the given one, or a fresh stack stopped again on exit."""
    from duanflow import _config

    if use_running:
        yield data_dir or _config.home() / "local"
        return
    home = Path(tempfile.mkdtemp(prefix="duanflow-bench-"))
    own = home / "local"
    os.environ["DUANFLOW_HOME"] = str(home)  # the `local` profile this stack writes stays out of the user's home
    note(f"starting a local stack in {own}")
    try:
        cli("dev", "up", "--detach", "--data-dir", str(own))
        yield own
    finally:
        note("stopping the local stack")
        try:
            cli("dev", "down", "--data-dir", str(own), timeout_s=120)
        finally:
            shutil.rmtree(home, ignore_errors=True)


def nats_service_login(data_dir: Path) -> tuple[str, str, str]:
    """NATS URL and the service role's user and password of the local stack in ``data_dir``."""
    import msgspec
    from duanflow._local.state import CREDENTIALS_FILE, StackCredentials, load_state

    state = load_state(data_dir)
    creds_path = data_dir / CREDENTIALS_FILE
    if state is None or not state.nats_url or not creds_path.exists():
        raise SystemExit(
            f"no running local stack in {data_dir}: start one with `duanflow dev up` or drop --use-running"
        )
    creds = msgspec.json.decode(creds_path.read_bytes(), type=StackCredentials)
    return state.nats_url, "service", creds.nats["service"]


# --------------------------------------------------------------------------- the floor: raw NATS request/reply


async def responder() -> None:
    """The trivial responder (a separate process): echo every request on a fresh inbox subject until stdin ends."""
    url, user, password = json.loads(os.environ[ENV_RESPONDER])
    nc = await nats.connect(url, user=user, password=password, name="bench-responder")

    async def echo(msg: Any) -> None:
        await msg.respond(msg.data)

    subject = nc.new_inbox()
    await nc.subscribe(subject, cb=echo)
    await nc.flush()
    print(subject, flush=True)
    await asyncio.to_thread(sys.stdin.read)  # the parent closes our stdin when it is done
    await nc.drain()


async def bench_nats_floor(login: tuple[str, str, str], n: int, warmup: int, total: int, inflight: int) -> None:
    """Request/reply through the stack's NATS server to a responder in another process."""
    proc = subprocess.Popen(
        [sys.executable, __file__, "--responder"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, ENV_RESPONDER: json.dumps(login)},
    )
    assert proc.stdin is not None and proc.stdout is not None
    try:
        subject = (await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 30)).strip()
        if not subject:
            raise SystemExit("the NATS responder did not start")
        url, user, password = login
        nc = await nats.connect(url, user=user, password=password, name="bench-requester")
        payload = PAYLOAD.encode()

        async def call() -> object:
            return await nc.request(subject, payload, timeout=10)

        note(f"NATS floor: {n} sequential requests, then {total} with {inflight} in flight")
        report_sequential("nats_request_reply", await time_sequential_async(call, n, warmup))
        report_throughput("nats_request_reply", inflight, await throughput_async(call, total, inflight))
        await nc.drain()
    finally:
        proc.stdin.close()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def js_responder() -> None:
    """A minimal JetStream worker (a separate process): pull one message, reply to its ``Df-Reply``, ack with +NXT."""
    from duanflow_proto import subjects

    url, user, password, stream, consumer = json.loads(os.environ[ENV_RESPONDER])
    nc = await nats.connect(url, user=user, password=password, name="bench-js-responder")
    inbox = nc.new_inbox()
    nxt = subjects.consumer_next(stream, consumer)
    req = json.dumps({"batch": 1, "expires": 5_000_000_000}).encode()

    async def on_msg(msg: Any) -> None:
        if not msg.data:  # 408: the request expired with nothing for it
            await nc.publish(nxt, req, reply=inbox)
            return
        await nc.publish(msg.headers[HDR_REPLY], msg.data)
        await nc.publish(msg.reply, b"+NXT " + req, reply=inbox)

    await nc.subscribe(inbox, cb=on_msg)
    await nc.publish(nxt, req, reply=inbox)
    await nc.flush()
    print("ready", flush=True)
    await asyncio.to_thread(sys.stdin.read)
    await nc.close()


async def bench_jetstream_floor(d: Any, n: int, warmup: int) -> None:
    """Publish to JetStream → a minimal worker in another process → reply on an inbox: what JetStream itself costs."""
    from duanflow_proto import subjects
    from nats.js.api import AckPolicy, ConsumerConfig

    url, user, password = d.login
    nc = await nats.connect(url, user=user, password=password, name="bench-js-requester")
    subject = subjects.invocation(d.env, d.app_name, "floor")
    consumer = f"bench_floor_{os.getpid()}"
    await nc.jetstream().add_consumer(
        subjects.STREAM_INVOCATIONS,
        ConsumerConfig(durable_name=consumer, ack_policy=AckPolicy.EXPLICIT, filter_subject=subject, ack_wait=30),
    )
    login = [url, user, password, subjects.STREAM_INVOCATIONS, consumer]
    proc = subprocess.Popen(
        [sys.executable, __file__, "--js-responder"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, ENV_RESPONDER: json.dumps(login)},
    )
    assert proc.stdin is not None and proc.stdout is not None
    try:
        if (await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 30)).strip() != "ready":
            raise SystemExit("the JetStream responder did not start")
        inbox = nc.new_inbox()
        waiter: list[asyncio.Future[None]] = []

        async def on_reply(msg: Any) -> None:
            waiter[0].set_result(None)

        await nc.subscribe(inbox, cb=on_reply)
        loop = asyncio.get_running_loop()

        async def call() -> object:
            waiter[:] = [loop.create_future()]
            await nc.publish(subject, PAYLOAD.encode(), headers={HDR_REPLY: inbox})
            await waiter[0]
            return None

        note(f"JetStream floor: {n} sequential publish → pull → reply round trips")
        report_sequential("nats_jetstream_roundtrip", await time_sequential_async(call, n, warmup))
    finally:
        proc.stdin.close()
        proc.wait(10)
        await nc.close()


# --------------------------------------------------------------------------- DuanFlow: warm .remote()


def deploy_bench_app(workdir: Path) -> Any:
    """Deploy the trivial app with the CLI; return a handle on its function."""
    import duanflow as df

    app_file = workdir / "bench_latency_app.py"
    app_file.write_text(APP_SOURCE, encoding="utf-8")
    note(f"deploying {app_file}")
    cli("deploy", str(app_file))
    return df.Function.from_name(BENCH_APP, BENCH_FUNCTION)


def bench_duanflow(fn: Any, n: int, warmup: int, total: int, inflight: int) -> None:
    """Time warm ``.remote()`` (sync) and ``.remote.aio()`` (concurrent) of the trivial function."""
    first = fn.remote(PAYLOAD)
    if first != PAYLOAD:
        raise SystemExit(f"{BENCH_APP}.{BENCH_FUNCTION} returned {first!r}, expected {PAYLOAD!r}")
    note(f"DuanFlow: {n} sequential .remote() calls, then {total} .remote.aio() with {inflight} in flight")
    report_sequential("duanflow_remote", time_sequential(lambda: fn.remote(PAYLOAD), n, warmup))
    # The same calls through the client's background thread (the path before the sync lane), for the ratio: with
    # the lane's lock held here, sync calls find it busy and take that path.
    from duanflow._client import get_client

    lane = get_client()._lane
    if lane is not None and lane.lock.acquire(blocking=False):
        try:
            note(f"DuanFlow: {n} sequential .remote() calls through the background thread")
            report_sequential("duanflow_remote_threaded", time_sequential(lambda: fn.remote(PAYLOAD), n, warmup))
        finally:
            lane.lock.release()

    async def concurrent() -> float:
        async def call() -> object:
            return await fn.remote.aio(PAYLOAD)

        for _ in range(warmup // 4 or 1):
            await call()
        return await throughput_async(call, total, inflight)

    try:
        report_throughput("duanflow_remote_aio", inflight, asyncio.run(concurrent()))
    finally:
        from duanflow._client import reset_client

        reset_client()  # close the connection before the stack this script started goes away


# --------------------------------------------------------------------------- peers


def skipped(peer: str, reason: str) -> None:
    """One line saying a peer was not measured, and why."""
    emit(peer, "skipped", None, None, reason=reason)


def _peers_module() -> Any:
    sys.path.insert(0, str(Path(__file__).parent))
    import _peers  # type: ignore[import-not-found,unused-ignore]

    return _peers


def bench_ray(n: int, warmup: int, total: int, inflight: int) -> None:
    """Ray tasks on a local Ray instance (2 CPUs): ``ray.get(f.remote(x))``, then ``inflight`` outstanding."""
    peers = _peers_module()
    try:
        with peers.ray_local() as ray:
            echo = ray.remote(lambda x: x)
            note(f"Ray: {n} sequential tasks, then {total} with {inflight} in flight")
            report_sequential("ray_task", time_sequential(lambda: ray.get(echo.remote(PAYLOAD)), n, warmup))
            start = time.perf_counter()
            pending = [echo.remote(PAYLOAD) for _ in range(min(inflight, total))]
            submitted = len(pending)
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                ray.get(done)
                if submitted < total:
                    pending.append(echo.remote(PAYLOAD))
                    submitted += 1
            report_throughput("ray_task", inflight, total / (time.perf_counter() - start))
    except peers.PeerUnavailable as exc:
        skipped("ray", str(exc))
    except Exception as exc:  # a peer's failure never ends the bench
        skipped("ray", f"{type(exc).__name__}: {exc}")


def bench_celery(broker: str, n: int, warmup: int, total: int, inflight: int) -> None:
    """Celery tasks to a worker process (threads pool) through ``broker``, else a private redis-server."""
    peers = _peers_module()
    try:
        with contextlib.ExitStack() as stack:
            broker = broker or stack.enter_context(peers.redis_server())
            backend = broker if broker.startswith(("redis://", "rediss://")) else "rpc://"
            module = stack.enter_context(
                peers.celery_app(broker, backend=backend, pool="threads", concurrency=inflight)
            )
            echo = module.echo
            note(f"Celery: {n} sequential tasks, then {total} with {inflight} in flight")
            report_sequential("celery_task", time_sequential(lambda: echo.delay(PAYLOAD).get(timeout=30), n, warmup))
            start = time.perf_counter()
            for first in range(0, total, inflight):
                batch = [echo.delay(PAYLOAD) for _ in range(min(inflight, total - first))]
                for result in batch:
                    result.get(timeout=30)
            report_throughput("celery_task", inflight, total / (time.perf_counter() - start))
    except peers.PeerUnavailable as exc:
        skipped("celery", str(exc))
    except Exception as exc:  # a peer's failure never ends the bench
        skipped("celery", f"{type(exc).__name__}: {exc}")


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--use-running", action="store_true", help="use the running local stack, start none")
    parser.add_argument(
        "--direct",
        action="store_true",
        help="no stack: a NATS server, the consumer and one replica only (bench/_direct.py)",
    )
    parser.add_argument("--data-dir", type=Path, default=None, help="its data dir (default: $DUANFLOW_HOME/local)")
    parser.add_argument("-n", "--sequential", type=int, default=1000, help="timed sequential calls per subject")
    parser.add_argument("--warmup", type=int, default=100, help="untimed calls first")
    parser.add_argument("--inflight", type=int, default=64, help="calls outstanding in the throughput run")
    parser.add_argument("--total", type=int, default=2000, help="calls in the throughput run")
    parser.add_argument(
        "--celery-broker",
        default=os.environ.get("CELERY_BROKER_URL", ""),
        help="Celery broker URL (default: a private redis-server started for the bench)",
    )
    parser.add_argument("--responder", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--js-responder", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.responder:
        asyncio.run(responder())
        return 0
    if args.js_responder:
        asyncio.run(js_responder())
        return 0
    if min(args.sequential, args.inflight, args.total) < 1 or args.warmup < 0:
        parser.error("--sequential, --inflight and --total must be positive, --warmup not negative")

    # SIGTERM (a timeout, Ctrl-C of a parent) unwinds like an exception, so a stack this script started is stopped
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    sizes = (args.sequential, args.warmup, args.total, args.inflight)
    with tempfile.TemporaryDirectory(prefix="duanflow-bench-work-") as tmp:
        workdir = Path(tmp)
        if args.direct:
            sys.path.insert(0, str(Path(__file__).parent))
            from _direct import direct  # type: ignore[import-not-found,unused-ignore]

            with direct(APP_SOURCE, BENCH_APP) as d:
                d.start_replica(BENCH_FUNCTION)
                asyncio.run(bench_nats_floor(d.login, *sizes))
                asyncio.run(bench_jetstream_floor(d, args.sequential, args.warmup))
                bench_duanflow(getattr(d.module, BENCH_FUNCTION), *sizes)
        else:
            with local_stack(args.use_running, args.data_dir) as data_dir:
                asyncio.run(bench_nats_floor(nats_service_login(data_dir), *sizes))
                bench_duanflow(deploy_bench_app(workdir), *sizes)
        bench_ray(*sizes)
        bench_celery(args.celery_broker, *sizes)
    ours = MEDIANS.get("duanflow_remote")
    for other in (
        "nats_request_reply",
        "nats_jetstream_roundtrip",
        "duanflow_remote_threaded",
        "ray_task",
        "celery_task",
    ):
        if ours and MEDIANS.get(other):
            emit("duanflow_remote", f"median_ratio_to_{other}", round(ours / MEDIANS[other], 2), "x")
    return 0


if __name__ == "__main__":
    sys.exit(main())

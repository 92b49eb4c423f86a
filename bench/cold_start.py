"""Cold start: no replica → first result, with the code already on the machine (process runtime).

``python bench/cold_start.py [--runs 7]``: for each run, a call is made while its function has no replica, then a
replica is started exactly as an agent starts one (``python -m duanflow._runtime`` with the contract's env,
bundle already extracted) — ``spawn``: a fresh interpreter; ``zygote``: forked from a pre-loaded
``python -m duanflow._runtime.zygote`` — and the figure is the time from that start to the call's result, with
its part until the replica announced readiness (imports, user module, NATS connect, consumer bind).
The NATS request/reply floor is measured in the same run. One JSON line per figure on stdout.

``duanflow_scale_from_zero_router``: the whole path through the router's autoscaler, on a local stack of NATS,
Postgres, S3, the router and an agent (process runtime, bundle already on the agent): a deployed function idles
to zero replicas (a 1 s idle window), then ``.remote()`` is timed until its result — the router sees the input on
its watch of the function's subject, places a replica, the agent starts it, it pulls the waiting call.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from _direct import direct  # type: ignore[import-not-found,unused-ignore]
from remote_latency import bench_nats_floor, emit, note, p99, skipped  # type: ignore[import-not-found,unused-ignore]

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


ZERO_IDLE_WINDOW_S = 1.0


@contextlib.contextmanager
def router_stack(root: Path) -> Iterator[Any]:
    """NATS, Postgres, S3, the router (1 s idle window) and a CPU agent, started as ``duanflow dev up`` does."""
    from duanflow._local.stack import Stack

    data = root / "stack"
    tweaks = {
        "router": [
            "env",
            f"DUANFLOW_ROUTER_IDLE_WINDOW_S={ZERO_IDLE_WINDOW_S}",
            "DUANFLOW_ROUTER_AUTOSCALE_INTERVAL_S=0.2",
        ],
        "agent": ["env", f"DUANFLOW_AGENT_WORK_DIR={root / 'agent'}", "DUANFLOW_AGENT_REPORT_INTERVAL_S=0.2"],
    }
    commands = {name: [*args, sys.executable, "-m", f"duanflow_{name}"] for name, args in tweaks.items()}
    state = Stack.up(data, services=("router", "agent"), commands=commands, write_profile=False, timeout=120)
    try:
        yield state
    finally:
        Stack.down(data)


async def deploy_zero_app(state: Any, root: Path, app_name: str) -> Any:
    """Deploy the bench app's ``hello`` through the router (no image: the agent's Python); its module."""
    import importlib
    import zipfile

    import nats
    from duanflow._local.state import load_or_create_credentials
    from duanflow_kit.handlers import decode_reply
    from duanflow_proto import codec, subjects
    from duanflow_proto.messages.release import DeployReply, DeployRequest, UploadUrlReply, UploadUrlRequest

    creds = load_or_create_credentials(Path(state.data_dir))
    module_name = f"bench_zero_{uuid.uuid4().hex[:8]}"
    app_dir = root / "zero_app"
    app_dir.mkdir(parents=True)
    src = app_dir / f"{module_name}.py"
    src.write_text(APP_SOURCE.replace(APP, app_name), encoding="utf-8")
    bundle = root / "zero_app.zip"
    with zipfile.ZipFile(bundle, "w") as zf:
        zf.write(src, src.name)
    data = bundle.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    sys.path.insert(0, str(app_dir))
    module = importlib.import_module(module_name)
    nc = await nats.connect(state.nats_url, user="client", password=creds.nats["client"])
    try:

        async def call(subject: str, msg: Any, reply_type: Any, timeout: float = 30) -> Any:
            reply = await nc.request(subject, codec.encode(msg), timeout=timeout)
            return decode_reply(reply.data, reply_type)

        up = await call(subjects.API_BUNDLE_UPLOAD, UploadUrlRequest(digest=digest, size=len(data)), UploadUrlReply)
        if not up.exists:
            request = urllib.request.Request(up.url, data=data, method="PUT")
            await asyncio.to_thread(lambda: urllib.request.urlopen(request, timeout=30).close())
        spec = module.app.build_spec(module=module_name)
        deploy = DeployRequest(spec=spec, env="main", bundle_key=up.key, bundle_digest=digest)
        for _ in range(60):  # until the agent's first report reached the router
            try:
                await call(subjects.API_DEPLOY, deploy, DeployReply, timeout=120)
                break
            except Exception as exc:
                if "no agent" not in str(exc) and "no free capacity" not in str(exc):
                    raise
                await asyncio.sleep(0.5)
    finally:
        await nc.close()
    os.environ.update(
        DUANFLOW_NATS_URL=state.nats_url,
        DUANFLOW_NATS_USER="client",
        DUANFLOW_NATS_PASSWORD=creds.nats["client"],
        DUANFLOW_ENV="main",
    )
    return creds


async def measure_from_zero(state: Any, creds: Any, app_name: str, runs: int) -> list[float]:
    """``runs`` rounds of: wait until ``hello`` has no replica, then time one ``.remote()`` to its result."""
    import duanflow as df
    import nats
    from duanflow import _client
    from duanflow_proto import codec, subjects
    from duanflow_proto.messages.agent import CapacityReport

    _client.reset_client()
    hello = df.Function.from_name(app_name, "hello", env="main")
    live: dict[str, int] = {}

    async def on_report(msg: Any) -> None:
        report = codec.decode(msg.data, CapacityReport)
        live[report.agent_id] = sum(
            1 for r in report.replicas if r.app == app_name and r.function == "hello" and r.state != "exited"
        )

    nc = await nats.connect(state.nats_url, user="service", password=creds.nats["service"])
    await nc.subscribe(subjects.CAPACITY_ALL, cb=on_report)
    samples: list[float] = []
    try:
        assert await hello.remote.aio("warm") == "hello warm"  # connect and resolve the function first
        for i in range(runs):
            deadline = time.monotonic() + 120
            live.clear()
            while not live or any(live.values()):
                if time.monotonic() > deadline:
                    raise SystemExit("the function never scaled to zero: see the router's log")
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.5)  # the leader's pass that saw it at zero has set up its watch
            started = time.perf_counter()
            value = await hello.remote.aio("zero")
            samples.append((time.perf_counter() - started) * 1e3)
            if value != "hello zero":
                raise SystemExit(f"unexpected result {value!r}")
            note(f"scale from zero {i + 1}: first result after {samples[-1]:.0f} ms")
    finally:
        await nc.close()
    return samples


def measure_router(runs: int) -> None:
    """The scale-from-zero figure through the router (median and p99 over ``runs`` rounds)."""
    root = Path(tempfile.mkdtemp(prefix="duanflow-bench-zero-"))
    app_name = f"bench-zero-{uuid.uuid4().hex[:6]}"
    try:
        with router_stack(root) as state:
            creds = asyncio.run(deploy_zero_app(state, root, app_name))
            samples = asyncio.run(measure_from_zero(state, creds, app_name, runs))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    bench = "duanflow_scale_from_zero_router"
    emit(bench, "first_result_median", round(statistics.median(samples), 1), "ms", target="300")
    emit(bench, "first_result_p99", round(p99(samples), 1), "ms", runs=str(runs))


def main(argv: list[str] | None = None) -> int:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=7, help="cold starts measured")
    parser.add_argument("--router-runs", type=int, default=9, help="scale-from-zero rounds through the router")
    parser.add_argument("--router-only", action="store_true", help="only the scale-from-zero figure")
    args = parser.parse_args(argv)
    if args.router_only:
        measure_router(args.router_runs)
        return 0
    with direct(APP_SOURCE, APP) as d:
        asyncio.run(bench_nats_floor(d.login, 200, 50, 2000, 64))
        measure(d, args.runs, None, "duanflow_cold_start_spawn")
        zygote = Zygote()
        try:
            measure(d, args.runs, zygote, "duanflow_cold_start_zygote")
        finally:
            zygote.close()
    measure_router(args.router_runs)
    skipped("ray", "cold start of a Ray worker is not comparable without a Ray cluster here")
    return 0


if __name__ == "__main__":
    sys.exit(main())

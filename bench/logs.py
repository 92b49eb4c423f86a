"""Log throughput and ``duanflow logs --follow`` latency on a real NATS server.

``python bench/logs.py [--lines 200000] [--publishers 2] [--latency-lines 300]``:

1. starts NATS (JetStream, per-role users) in a temporary directory and creates the streams;
2. starts ``duanflow logs APP --follow --json`` (the real CLI, a separate process) and waits until it shows a line;
3. throughput: ``--publishers`` processes publish ``--lines`` log lines in all at ``--rate`` lines/s together
   (0: unpaced), as replicas' relays do (core NATS publishes into the logs stream); measured are lines/s into the
   stream (until its count settles), lines JetStream did not keep (core publishes are not flow-controlled), lines/s
   out of the CLI (first publish to the last line on its stdout) and lines it missed;
4. latency: lines written one at a time (each after the previous one was shown); measured from the write to the
   line being read from the CLI's stdout: median and p99.

One JSON line per figure on stdout (``{"bench": "logs", "metric": ..., "value": ..., "unit": ...}``); progress on
stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import queue
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import nats
from duanflow._local import servers
from duanflow_kit.streams import ensure_streams
from duanflow_proto import codec, subjects
from duanflow_proto.messages.logs import LogLine
from remote_latency import emit, note, p99  # type: ignore[import-not-found,unused-ignore]

ENV = "main"
PASSWORD_VAR = "DUANFLOW_BENCH_NATS_PASSWORD"


def line(app: str, replica: str, i: int, message: str) -> bytes:
    return codec.encode(
        LogLine(
            ts_ms=time.time_ns() // 1_000_000,
            env=ENV,
            app=app,
            kind="runtime",
            source=replica,
            message=message,
            stream="stdout",
            function="f",
            replica=replica,
        )
    )


async def publish_lines(url: str, password: str, app: str, replica: str, count: int, rate: float = 0) -> None:
    """Publish ``count`` lines as one replica's relay does (core publishes, flushed at the end); ``rate`` lines/s
    (0: as fast as possible), in 10 ms steps."""
    nc = await nats.connect(url, user="service", password=password, pending_size=64 * 1024 * 1024)
    subject = subjects.logs(ENV, app, "runtime", replica)
    publish = nc.publish
    step = max(1, int(rate / 100)) if rate else count
    t0 = time.perf_counter()
    for first in range(0, count, step):
        for i in range(first, min(count, first + step)):
            await publish(subject, line(app, replica, i, f"request {i} handled in 3.2 ms status=200"))
        if rate:
            await nc.flush(timeout=60)
            ahead = t0 + (first + step) / rate - time.perf_counter()
            if ahead > 0:
                await asyncio.sleep(ahead)
    await nc.flush(timeout=60)
    await nc.close()


async def stream_count(url: str, password: str, app: str) -> int:
    nc = await nats.connect(url, user="service", password=password)
    try:
        info = await nc.jetstream().stream_info(subjects.STREAM_LOGS, subjects_filter=subjects.logs_filter(ENV, app))
        return sum((info.state.subjects or {}).values())
    finally:
        await nc.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=200_000)
    parser.add_argument("--publishers", type=int, default=2)
    parser.add_argument("--latency-lines", type=int, default=300)
    parser.add_argument(
        "--rate", type=float, default=60_000, help="lines/s offered by all publishers together (0: unpaced)"
    )
    parser.add_argument("--publisher", nargs=4, metavar=("URL", "APP", "COUNT", "RATE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.publisher:
        url, app, count, rate = args.publisher  # the password comes in the environment (it may start with "-")
        asyncio.run(publish_lines(url, os.environ[PASSWORD_VAR], app, f"rp-{os.getpid()}", int(count), float(rate)))
        return 0

    root = Path(tempfile.mkdtemp(prefix="duanflow-bench-logs-"))
    creds = servers.NatsCredentials.generate()
    proc = servers.start_nats(root / "nats", creds)
    app = f"bench-logs-{uuid.uuid4().hex[:6]}"
    cli: subprocess.Popen[bytes] | None = None
    try:
        asyncio.run(_setup(proc.address, creds.service))
        env = {
            **os.environ,
            "DUANFLOW_HOME": str(root / "home"),
            "DUANFLOW_NATS_URL": proc.address,
            "DUANFLOW_NATS_USER": "client",
            "DUANFLOW_NATS_PASSWORD": creds.client,
            "DUANFLOW_ENV": ENV,
        }
        cmd = [sys.executable, "-m", "duanflow._cli", "logs", app, "--follow", "--json"]
        cli = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, bufsize=1 << 20)
        assert cli.stdout is not None
        out = cli.stdout
        asyncio.run(publish_lines(proc.address, creds.service, app, "rp-warm", 1))
        out.readline()  # the follower is live
        note(f"follower live; publishing {args.lines} lines from {args.publishers} publishers")

        per = args.lines // args.publishers
        total = per * args.publishers
        got = [0, 0.0]  # lines shown, time of the last one
        probes: queue.Queue[bytes] = queue.Queue()
        latency_phase = threading.Event()

        def follow() -> None:  # the one reader of the follower's stdout
            while text := out.readline():
                if latency_phase.is_set():
                    probes.put(text)
                    continue
                got[0] += 1
                got[1] = time.perf_counter()

        threading.Thread(target=follow, daemon=True).start()
        started = time.perf_counter()
        pubs = [
            subprocess.Popen(
                [
                    sys.executable,
                    __file__,
                    "--publisher",
                    proc.address,
                    app,
                    str(per),
                    str(args.rate / args.publishers),
                ],
                env={**env, PASSWORD_VAR: creds.service},
            )
            for _ in range(args.publishers)
        ]
        failed = [p.returncode for p in pubs if p.wait(120) != 0]
        if failed:
            raise RuntimeError(f"publishers failed: exit codes {failed}")
        # the stream's count settles: every line, or what JetStream kept of core publishes under this flood
        stored, settled_at = -1, time.perf_counter()
        while True:
            now_stored = asyncio.run(stream_count(proc.address, creds.service, app)) - 1  # less the warm-up line
            if now_stored != stored:
                stored, settled_at = now_stored, time.perf_counter()
                in_stream_s = settled_at - started
            if stored >= total or time.perf_counter() - settled_at > 2:
                break
        while got[0] < stored and time.perf_counter() - max(got[1], settled_at) < 10:
            time.sleep(0.01)
        emit(
            "logs",
            "stream_ingest_lines_per_s",
            round(stored / in_stream_s, 1),
            "lines/s",
            publishers=str(args.publishers),
            offered_lines_per_s=str(args.rate or "unpaced"),
            lines=str(stored),
        )
        emit("logs", "stream_lines_lost", total - stored, "lines", published=str(total))
        emit("logs", "follow_lines_per_s", round(got[0] / (got[1] - started), 1), "lines/s", lines=str(got[0]))
        emit("logs", "follow_lines_missed", stored - got[0], "lines", stored=str(stored))

        latency_phase.set()
        delays = asyncio.run(_latency(proc.address, creds.service, app, args.latency_lines, probes))
        emit("logs", "follow_latency_median", round(statistics.median(delays) * 1000, 3), "ms", n=str(len(delays)))
        emit("logs", "follow_latency_p99", round(p99(delays) * 1000, 3), "ms", n=str(len(delays)))
        return 0
    finally:
        if cli is not None:
            cli.terminate()
            cli.wait(10)
        proc.stop()
        shutil.rmtree(root, ignore_errors=True)


async def _setup(url: str, password: str) -> None:
    nc = await nats.connect(url, user="service", password=password)
    try:
        await ensure_streams(nc.jetstream())
    finally:
        await nc.close()


async def _latency(url: str, password: str, app: str, n: int, probes: queue.Queue[bytes]) -> list[float]:
    nc = await nats.connect(url, user="service", password=password)
    loop = asyncio.get_running_loop()
    subject = subjects.logs(ENV, app, "runtime", "rp-latency")
    delays: list[float] = []
    try:
        for i in range(n):
            sent = time.perf_counter()
            await nc.publish(subject, line(app, "rp-latency", i, f"latency probe {i}"))
            await nc.flush()
            text = await loop.run_in_executor(None, functools.partial(probes.get, timeout=10))
            delays.append(time.perf_counter() - sent)
            got = json.loads(text)["message"]
            if got != f"latency probe {i}":
                raise RuntimeError(f"expected probe {i}, got {got!r}")
    finally:
        await nc.close()
    return delays


if __name__ == "__main__":
    sys.exit(main())

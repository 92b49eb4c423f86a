"""HTTP → gateway → endpoint replica → HTTP, next to the floor: a plain Litestar echo app on uvicorn.

In one run (``python bench/gateway.py``): starts a real NATS server, the gateway (``python -m duanflow_gateway``)
and one replica of a sync echo endpoint (``def``, as on the product page; ``python -m duanflow._runtime``), and, as
the floor, a Litestar app with the same echo route on uvicorn in its own process. Each is measured the same way by a
minimal keep-alive HTTP/1.1 client (so the client's own cost stays small): a sequential run (median and p99
latency), then ``--connections`` connections at once for ``--seconds`` (requests/s and p99). Every figure is one
JSON line on stdout with the floor's figure and the ratio; progress goes to stderr.

``nats_invocation_median`` measures, in the same run, the part no HTTP server can remove: the same invocation the
gateway makes, published by a nats-py client to the endpoint's direct subject (the warm replicas' queue group, as
the gateway does), run by the same replica, its result back on an inbox (no HTTP at all). ``sequential_median`` is
roughly that plus the floor plus the gateway's own work.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

import httpx
import nats
from duanflow._local import servers
from duanflow_gateway.domain import invocation_args
from duanflow_proto import codec, subjects
from duanflow_proto.messages.invocation import CODEC_JSON, HDR_CALL_ID, HDR_REPLY, Invocation, Result
from duanflow_proto.messages.release import Release
from duanflow_router.domain import route_entries

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _direct import direct  # type: ignore[import-not-found]

APP_NAME = "bench-gateway"
PATH = "/bench/echo"
APP_SOURCE = f'''
import duanflow as df

app = df.App("{APP_NAME}")


@app.endpoint(method="POST", path="{PATH}", concurrency=256)
def echo(request):
    return request.json()
'''

FLOOR_SOURCE = f'''
from typing import Any

from litestar import Litestar, post


@post("{PATH}", sync_to_thread=False, status_code=200)
def echo(data: dict[str, Any]) -> dict[str, Any]:
    return data


app = Litestar([echo], openapi_config=None)
'''

BODY = b'{"messages":[{"role":"user","content":"hello"}],"n":1}'


def note(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def request_bytes(port: int) -> bytes:
    return (
        f"POST {PATH} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(BODY)}\r\n\r\n"
    ).encode() + BODY


async def one(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, req: bytes) -> None:
    writer.write(req)
    head = await reader.readuntil(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(f"unexpected answer: {head[:200]!r}")
    length = 0
    chunked = False
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.lower() == b"content-length":
            length = int(value)
        elif name.lower() == b"transfer-encoding":
            chunked = True
    if chunked:
        raise RuntimeError("chunked answer where a plain one was expected")
    await reader.readexactly(length)


async def sequential(port: int, n: int) -> list[float]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    req = request_bytes(port)
    for _ in range(min(200, n // 5)):
        await one(reader, writer, req)
    times: list[float] = []
    for _ in range(n):
        t0 = time.perf_counter()
        await one(reader, writer, req)
        times.append(time.perf_counter() - t0)
    writer.close()
    return times


async def nats_invocations(url: str, password: str, subject: str, n: int) -> list[float]:
    """Sequential invocations as the gateway publishes them (JSON args, to the direct subject), straight over NATS."""
    nc = await nats.connect(url, user="service", password=password)
    inbox = nc.new_inbox()
    waiting: dict[str, asyncio.Future[bytes]] = {}

    async def on_result(msg: Any) -> None:
        fut = waiting.pop(msg.subject.rsplit(".", 1)[1], None)
        if fut is not None and not fut.done():
            fut.set_result(msg.data)

    await nc.subscribe(f"{inbox}.*", cb=on_result)
    value = json.loads(BODY)
    args = invocation_args("POST", PATH, {}, [], [("content-type", "application/json")], value, BODY)
    loop = asyncio.get_running_loop()
    times: list[float] = []
    try:
        for i in range(n + min(200, n // 5)):
            call_id = f"fc-bench-{i}-{os.getpid()}"
            inv = Invocation(
                call_id=call_id,
                function="echo",
                args=args,
                codec=CODEC_JSON,
                deadline_ms=int(time.time() * 1000) + 60_000,
            )
            headers = {HDR_REPLY: f"{inbox}.{call_id}", HDR_CALL_ID: call_id, "Nats-Msg-Id": call_id}
            t0 = time.perf_counter()
            fut = waiting[call_id] = loop.create_future()
            await nc.publish(subject, codec.encode(inv), reply=f"{inbox}.{call_id}.ack", headers=headers)
            result = codec.decode(await asyncio.wait_for(fut, 30), Result)
            if not result.ok:
                raise RuntimeError(f"invocation failed: {result.error}")
            if i >= min(200, n // 5):
                times.append(time.perf_counter() - t0)
    finally:
        await nc.close()
    return times


async def concurrent(port: int, connections: int, seconds: float) -> tuple[float, list[float]]:
    req = request_bytes(port)
    conns = [await asyncio.open_connection("127.0.0.1", port) for _ in range(connections)]
    times: list[float] = []
    stop = time.perf_counter() + 0.5  # warm-up

    async def worker(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, record: bool) -> int:
        done = 0
        while time.perf_counter() < stop:
            t0 = time.perf_counter()
            await one(reader, writer, req)
            if record:
                times.append(time.perf_counter() - t0)
            done += 1
        return done

    await asyncio.gather(*(worker(r, w, False) for r, w in conns))
    times.clear()
    start = time.perf_counter()
    stop = start + seconds
    counts = await asyncio.gather(*(worker(r, w, True) for r, w in conns))
    elapsed = time.perf_counter() - start
    for _, w in conns:
        w.close()
    return sum(counts) / elapsed, times


def cpu_s(pid: int) -> float:
    """CPU seconds (user + system) a process has used so far (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def wait_http(url: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 60
    while True:
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"{url} did not come up: see {log}")
        try:
            if httpx.get(url, timeout=1).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)


def start_floor(root: Path) -> tuple[subprocess.Popen[bytes], int]:
    (root / "floor_app.py").write_text(textwrap.dedent(FLOOR_SOURCE))
    port = servers.free_port()
    log = root / "floor.log"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "floor_app:app",
            "--port",
            str(port),
            "--log-level",
            "warning",
            "--no-access-log",
        ],
        cwd=root,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )
    wait_http(f"http://127.0.0.1:{port}/", proc, log)
    return proc, port


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=3000, help="sequential requests per target")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="duanflow-bench-gw-"))
    procs: list[subprocess.Popen[bytes]] = []
    try:
        with direct(APP_SOURCE, APP_NAME) as d:
            module = d.module
            spec = module.app.build_spec(module=module.__name__)
            release = Release(
                release_id="rel_20260101_0000",
                app=APP_NAME,
                env=d.env,
                created_ms=0,
                bundle_key="",
                bundle_digest="",
                image_id="",
                spec=spec,
                active=True,
            )

            async def put_routes() -> None:
                nc = await nats.connect(d.nats.address, user="service", password=d.creds.service)
                try:
                    kv = await nc.jetstream().key_value(subjects.KV_ROUTES)
                    for key, entry in route_entries(release).items():
                        await kv.put(key, codec.encode(entry))
                finally:
                    await nc.close()

            asyncio.run(put_routes())
            d.start_replica("echo")
            port = servers.free_port()
            env = {k: v for k, v in os.environ.items() if not k.startswith("DUANFLOW_")}
            env.update(
                DUANFLOW_NATS_URL=d.nats.address,
                DUANFLOW_NATS_USER="service",
                DUANFLOW_NATS_PASSWORD=d.creds.service,
                DUANFLOW_GATEWAY_HTTP_PORT=str(port),
                DUANFLOW_GATEWAY_ENV=d.env,
            )
            log = root / "gateway.log"
            gw = subprocess.Popen(
                [sys.executable, "-m", "duanflow_gateway"], env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT
            )
            procs.append(gw)
            wait_http(f"http://127.0.0.1:{port}/readyz", gw, log)
            floor, floor_port = start_floor(root)
            procs.append(floor)
            note("measuring sequential latency")
            replica = d.replicas[0].pid
            seq0 = (cpu_s(floor.pid), time.process_time())
            floor_seq = asyncio.run(sequential(floor_port, args.requests))
            seq1 = (cpu_s(floor.pid), time.process_time(), cpu_s(gw.pid), cpu_s(replica), cpu_s(d.nats.pid))
            gw_seq = asyncio.run(sequential(port, args.requests))
            seq2 = (time.process_time(), cpu_s(gw.pid), cpu_s(replica), cpu_s(d.nats.pid))
            subject = subjects.direct(d.env, APP_NAME, "echo")
            nats_seq = asyncio.run(nats_invocations(d.nats.address, d.creds.service, subject, args.requests))
            note(f"measuring {args.connections} connections for {args.seconds}s each")
            cpu0 = (cpu_s(gw.pid), cpu_s(replica), cpu_s(floor.pid), time.process_time())
            floor_rps, floor_times = asyncio.run(concurrent(floor_port, args.connections, args.seconds))
            cpu1 = (cpu_s(gw.pid), cpu_s(replica), cpu_s(floor.pid), time.process_time(), cpu_s(d.nats.pid))
            gw_rps, gw_times = asyncio.run(concurrent(port, args.connections, args.seconds))
            cpu2 = (cpu_s(gw.pid), cpu_s(replica), cpu_s(floor.pid), time.process_time(), cpu_s(d.nats.pid))
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
                p.wait(10)
    figures: list[dict[str, Any]] = []

    def emit(metric: str, value: float, floor_value: float, unit: str, target: str) -> None:
        figures.append(
            {
                "bench": "gateway",
                "metric": metric,
                "value": round(value, 4),
                "unit": unit,
                "floor": round(floor_value, 4),
                "ratio_to_floor": round(value / floor_value, 2) if floor_value else None,
                "target": target,
                "cpus": os.cpu_count(),
            }
        )

    ms = 1000.0
    emit("sequential_median", statistics.median(gw_seq) * ms, statistics.median(floor_seq) * ms, "ms", "<= 0.6")
    emit("sequential_p99", pct(gw_seq, 0.99) * ms, pct(floor_seq, 0.99) * ms, "ms", "")
    emit("nats_invocation_median", statistics.median(nats_seq) * ms, statistics.median(floor_seq) * ms, "ms", "")
    emit("nats_invocation_p99", pct(nats_seq, 0.99) * ms, pct(floor_seq, 0.99) * ms, "ms", "")
    emit(f"c{args.connections}_throughput", gw_rps, floor_rps, "req/s", ">= 8000")
    emit(f"c{args.connections}_p99", pct(gw_times, 0.99) * ms, pct(floor_times, 0.99) * ms, "ms", "<= 15")
    # CPU per sequential request: each process's own work on one request's path (the floor app's as the floor).
    n_seq = len(gw_seq) + min(200, args.requests // 5)  # warm-up requests included
    seq_floor = (seq1[0] - seq0[0]) / n_seq * 1e6
    emit("sequential_gateway_cpu_per_request", (seq2[1] - seq1[2]) / n_seq * 1e6, seq_floor, "us", "")
    emit("sequential_replica_cpu_per_request", (seq2[2] - seq1[3]) / n_seq * 1e6, seq_floor, "us", "")
    emit("sequential_nats_server_cpu_per_request", (seq2[3] - seq1[4]) / n_seq * 1e6, seq_floor, "us", "")
    emit(
        "sequential_client_cpu_per_request",
        (seq2[0] - seq1[1]) / n_seq * 1e6,
        (seq1[1] - seq0[1]) / n_seq * 1e6,
        "us",
        "",
    )
    # CPU per request (the 64-connection runs, warm-up included): where the time goes on a shared machine. The
    # gateway's, replica's and NATS server's figures have the floor app's as their floor.
    floor_n = floor_rps * (args.seconds + 0.5)
    gw_n = gw_rps * (args.seconds + 0.5)
    floor_cpu = (cpu1[2] - cpu0[2]) / floor_n * 1e6
    emit("gateway_cpu_per_request", (cpu2[0] - cpu1[0]) / gw_n * 1e6, floor_cpu, "us", "")
    emit("replica_cpu_per_request", (cpu2[1] - cpu1[1]) / gw_n * 1e6, floor_cpu, "us", "")
    emit("nats_server_cpu_per_request", (cpu2[4] - cpu1[4]) / gw_n * 1e6, floor_cpu, "us", "")
    # The load generator shares the machine: its CPU per request (floor run's figure as its floor).
    floor_client = (cpu1[3] - cpu0[3]) / floor_n * 1e6
    emit("client_cpu_per_request", (cpu2[3] - cpu1[3]) / gw_n * 1e6, floor_client, "us", "")
    for f in figures:
        print(json.dumps(f), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

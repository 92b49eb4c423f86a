"""The GPU router on a real GPU: NATS + Postgres + S3 + router + agent (NVML), a ``gpu="H100"`` function that
multiplies bf16 matrices with torch, placed on the real card; platform overhead against a direct call.

``python bench/gpu_e2e.py [--gpu H100] [--seconds 1.0] [--calls 10] [--out DIR] [--simulate]``

1. starts the servers and the router and agent (``duanflow._local.Stack``, real NVML on a GPU host);
2. reads the fleet from the router: the capacity report must show the real card (name, nominal memory class,
   driver and CUDA versions) and ``simulated: false``;
3. deploys an app whose function asks for ``gpu=--gpu`` (its own upload → deploy path, image = the agent's
   environment: no network needed), checks the scheduler placed it on that agent's GPU, and that a spec no
   card satisfies is refused as ``no_matching_gpu`` naming the constraint;
4. sets a live price through the router's API (what ``duanflow price set`` sends) and reads it back;
5. calls the function directly in this process and through ``.remote()`` (same inputs, about ``--seconds`` of
   bf16 matmuls each), checks the results agree, and reports the median wall times and the overhead.

``--simulate`` runs the same plumbing without a GPU (declared ``H100:1`` inventory, numpy-free Python matmul),
to check the script where there is no GPU; its figures mean nothing.

Each figure or check is one JSON line on stdout (and in ``--out``/gpu_e2e.jsonl).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import io
import json
import os
import statistics
import sys
import tempfile
import textwrap
import time
import urllib.request
import zipfile
from pathlib import Path
from typing import Any

APP = "gpu-e2e"

APP_SOURCE = """
import os
import time

import duanflow as df

app = df.App("gpu-e2e")


def _matmul(n: int, iters: int, seed: int) -> dict:
    if os.environ.get("GPU_E2E_SIMULATE") == "1":
        import random

        rng = random.Random(seed)
        a = [[rng.random() for _ in range(n)] for _ in range(n)]
        t0 = time.perf_counter()
        total = 0.0
        for _ in range(iters):
            total = sum(a[i][k] * a[k][j] for i in range(n) for j in range(n) for k in range(n))
        return {"checksum": round(total, 6), "max_err": 0.0, "gpu_s": time.perf_counter() - t0,
                "device": "simulated", "visible": os.environ.get("CUDA_VISIBLE_DEVICES", "")}
    import torch

    g = torch.Generator(device="cuda").manual_seed(seed)
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16, generator=g)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16, generator=g)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        c = a @ b
    torch.cuda.synchronize()
    gpu_s = time.perf_counter() - t0
    ref = a[:256].float() @ b.float()
    max_err = float(((c[:256].float() - ref).abs().max() / ref.abs().max()).item())
    return {
        "checksum": float(c.float().sum().item()),
        "max_err": max_err,
        "gpu_s": gpu_s,
        "device": torch.cuda.get_device_name(0),
        "visible": os.environ.get("CUDA_VISIBLE_DEVICES", ""),
    }


@app.function(gpu=os.environ.get("GPU_E2E_TYPE", "H100"), timeout=600)
def matmul(n: int, iters: int, seed: int) -> dict:
    return _matmul(n, iters, seed)


@app.function(gpu="B200", gpu_count=8, timeout=60)
def impossible(x: int) -> int:
    return x
"""


class Report:
    """JSON lines on stdout and in a file."""

    def __init__(self, out: Path | None) -> None:
        self.path = out / "gpu_e2e.jsonl" if out else None
        self.failed: list[str] = []

    def emit(self, metric: str, value: Any, unit: str = "", **extra: Any) -> None:
        line = json.dumps({"bench": "gpu_e2e", "metric": metric, "value": value, "unit": unit, **extra}, default=str)
        print(line, flush=True)
        if self.path:
            with self.path.open("a") as f:
                f.write(line + "\n")

    def check(self, name: str, ok: bool, **extra: Any) -> None:
        self.emit(f"check_{name}", bool(ok), "bool", **extra)
        if not ok:
            self.failed.append(name)


def log(msg: str) -> None:
    print(f"[gpu_e2e] {msg}", file=sys.stderr, flush=True)


async def request(nc: Any, subject: str, msg: Any, reply_type: Any, timeout: float = 30.0) -> Any:
    from duanflow_kit.handlers import decode_reply
    from duanflow_proto import codec

    reply = await nc.request(subject, codec.encode(msg), timeout=timeout)
    return decode_reply(reply.data, reply_type)


def bundle(app_dir: Path) -> tuple[bytes, str]:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for path in sorted(app_dir.glob("*.py")):
            info = zipfile.ZipInfo(path.name, date_time=(2020, 1, 1, 0, 0, 0))
            zf.writestr(info, path.read_bytes())
    data = buf.getvalue()
    return data, hashlib.sha256(data).hexdigest()


async def control_plane(args: argparse.Namespace, rep: Report, state: Any, creds: Any, app_dir: Path) -> None:
    """Fleet, deploy, no_matching_gpu, live price: everything that talks to the router."""
    import importlib

    import nats
    from duanflow_proto import subjects
    from duanflow_proto.errors import NoMatchingGpuError
    from duanflow_proto.messages.agent import FleetReply
    from duanflow_proto.messages.common import HealthRequest
    from duanflow_proto.messages.price import PriceList, PriceUpdate
    from duanflow_proto.messages.release import (
        AppSpec,
        DeployReply,
        DeployRequest,
        UploadUrlReply,
        UploadUrlRequest,
    )
    from duanflow_router.placement import nominal_mb, pool_name

    nc = await nats.connect(state.nats_url, user="service", password=creds.nats["service"])
    try:
        # 2. the capacity report shows the real card
        fleet: FleetReply = await request(nc, subjects.API_FLEET, HealthRequest(), FleetReply)
        agent = next(a for a in fleet.agents if a.agent_id == state.agent_id)
        card = agent.gpus[0] if agent.gpus else None
        rep.emit(
            "capacity_report",
            agent.agent_id,
            "",
            simulated=agent.simulated,
            driver=agent.driver_version,
            cuda=agent.cuda_version,
            region=agent.region,
            gpus=[
                {
                    "index": g.index,
                    "type": g.gpu_type,
                    "name": g.name,
                    "memory_total_mb": g.memory_total_mb,
                    "memory_class_gib": nominal_mb(g.gpu_type, g.memory_total_mb) // 1024,
                    "uuid": g.uuid[:12],
                    "util_pct": g.utilization_pct,
                    "temp_c": g.temperature_c,
                    "simulated": g.simulated,
                }
                for g in agent.gpus
            ],
        )
        if not args.simulate:
            rep.check("real_card", card is not None and args.gpu in card.gpu_type and not agent.simulated)
            rep.check("driver_reported", bool(agent.driver_version) and bool(agent.cuda_version))
            rep.check("nvidia_name", card is not None and "NVIDIA" in card.name.upper())

        # 3. deploy: upload the bundle, then DeployRequest (image = the agent's environment)
        sys.path.insert(0, str(app_dir))
        module = importlib.import_module("gpu_e2e_app")
        registry = module.app._registry()
        spec = AppSpec(name=APP, module="gpu_e2e_app", functions=[registry["matmul"].spec])
        data, digest = bundle(app_dir)
        ticket: UploadUrlReply = await request(
            nc, subjects.API_BUNDLE_UPLOAD, UploadUrlRequest(digest=digest, size=len(data)), UploadUrlReply
        )
        if not ticket.exists:
            put = urllib.request.Request(ticket.url, data=data, method="PUT")
            with urllib.request.urlopen(put, timeout=30) as resp:
                resp.read()
        t0 = time.perf_counter()
        reply: DeployReply = await request(
            nc,
            subjects.API_DEPLOY,
            DeployRequest(spec=spec, env="main", bundle_key=ticket.key, bundle_digest=digest),
            DeployReply,
            timeout=300,
        )
        deploy_s = time.perf_counter() - t0
        rep.emit("deploy_s", round(deploy_s, 3), "s", release=reply.release.release_id, messages=reply.messages)
        placed = " ".join(reply.messages)
        rep.check("placed_on_the_gpu", state.agent_id in placed and args.gpu in placed, messages=reply.messages)

        # a spec no card can satisfy fails the deploy, naming the constraint
        bad = AppSpec(name=f"{APP}-bad", module="gpu_e2e_app", functions=[registry["impossible"].spec])
        try:
            await request(
                nc,
                subjects.API_DEPLOY,
                DeployRequest(spec=bad, env="main", bundle_key=ticket.key, bundle_digest=digest),
                DeployReply,
            )
            rep.check("no_matching_gpu", False)
        except NoMatchingGpuError as exc:
            rep.check("no_matching_gpu", "B200" in exc.message, reason=exc.message[:300])

        # 4. a live price, as `duanflow price set POOL PRICE` sends it
        pool = pool_name(agent.region, card.gpu_type if card else args.gpu)
        prices: PriceList = await request(
            nc, subjects.API_PRICE_SET, PriceUpdate(pool=pool, price_per_gpu_hour=1.85), PriceList
        )
        rep.check("price_set", any(p.pool == pool and p.price_per_gpu_hour == 1.85 for p in prices.prices), pool=pool)
    finally:
        await nc.close()


def workload(args: argparse.Namespace, rep: Report, state: Any, creds: Any) -> None:
    """Direct call vs ``.remote()`` on the same inputs."""
    os.environ["DUANFLOW_NATS_URL"] = state.nats_url
    os.environ["DUANFLOW_NATS_USER"] = "client"
    os.environ["DUANFLOW_NATS_PASSWORD"] = creds.nats["client"]
    import duanflow as df
    import gpu_e2e_app  # type: ignore[import-not-found]

    direct = gpu_e2e_app._matmul
    remote = df.Function.from_name(APP, "matmul")
    n = 32 if args.simulate else 8192
    # calibrate: iterations for about --seconds of GPU work
    direct(n, 3, 0)
    probe = direct(n, 20, 0)
    per_iter = probe["gpu_s"] / 20
    iters = max(1, round(args.seconds / max(per_iter, 1e-9)))
    rep.emit("workload", iters, "matmuls", n=n, dtype="bf16", per_matmul_ms=round(per_iter * 1000, 4))
    remote.remote(n, 3, 0)  # warm: the replica's CUDA context and kernels
    direct_s: list[float] = []
    remote_s: list[float] = []
    results: list[tuple[dict[str, Any], dict[str, Any]]] = []
    for i in range(args.calls):
        t0 = time.perf_counter()
        d = direct(n, iters, i)
        direct_s.append(time.perf_counter() - t0)
        # An idle replica first (see --gap): the figure is the platform's path, not a pull-credit stall.
        time.sleep(args.gap)
        t0 = time.perf_counter()
        r = remote.remote(n, iters, i)
        remote_s.append(time.perf_counter() - t0)
        results.append((d, r))
    back_to_back: list[float] = []
    for i in range(args.back_to_back):
        t0 = time.perf_counter()
        remote.remote(n, iters, 100 + i)
        back_to_back.append(time.perf_counter() - t0)
    _, r0 = results[0]
    rep.emit("replica_device", r0["device"], "", cuda_visible_devices=r0["visible"])
    same = all(abs(d["checksum"] - r["checksum"]) <= 1e-3 * max(1.0, abs(d["checksum"])) for d, r in results)
    rep.check("result_right", same and all(r["max_err"] < 0.02 for _, r in results), max_err=r0["max_err"])
    if not args.simulate:
        rep.check("ran_on_the_gpu", args.gpu in r0["device"], device=r0["device"])
    dm, rm = statistics.median(direct_s), statistics.median(remote_s)
    rep.emit("direct_median_s", round(dm, 4), "s", calls=len(direct_s))
    rep.emit("remote_median_s", round(rm, 4), "s", calls=len(remote_s))
    overhead = (rm - dm) / dm
    rep.emit("platform_overhead", round(overhead * 100, 3), "%", target="<= 2", ms=round((rm - dm) * 1000, 2))
    if back_to_back:
        rep.emit("remote_back_to_back_s", [round(x, 4) for x in back_to_back], "s", note="consecutive calls, no gap")
    rep.emit("gpu_time_in_replica_median_s", round(statistics.median(r["gpu_s"] for _, r in results), 4), "s")
    if not args.simulate:
        rep.check("overhead_within_2pct", overhead <= 0.02)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpu", default="H100")
    parser.add_argument("--seconds", type=float, default=1.0)
    parser.add_argument("--calls", type=int, default=10)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--simulate", action="store_true")
    parser.add_argument(
        "--gap",
        type=float,
        default=0.0,
        help="seconds the replica idles before each measured remote call (7 steps over a replica pull stall)",
    )
    parser.add_argument("--back-to-back", type=int, default=3, help="extra consecutive remote calls, reported apart")
    args = parser.parse_args(argv)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
    rep = Report(args.out)
    root = Path(tempfile.mkdtemp(prefix="gpu-e2e-"))
    app_dir = root / "app"
    app_dir.mkdir()
    (app_dir / "gpu_e2e_app.py").write_text(textwrap.dedent(APP_SOURCE))
    os.environ["GPU_E2E_TYPE"] = args.gpu
    os.environ["DUANFLOW_AGENT_REGION"] = "local-gpu"
    os.environ["DUANFLOW_AGENT_PRICES"] = json.dumps({args.gpu: 2.49})
    if args.simulate:
        os.environ["GPU_E2E_SIMULATE"] = "1"
        os.environ["DUANFLOW_AGENT_GPUS"] = f"{args.gpu}:1"
    from duanflow._local.stack import Stack
    from duanflow._local.state import load_or_create_credentials

    t0 = time.perf_counter()
    state = Stack.up(root / "stack", services=("router", "agent"), write_profile=False, timeout=180)
    rep.emit("stack_up_s", round(time.perf_counter() - t0, 2), "s", agent=state.agent_id)
    creds = load_or_create_credentials(root / "stack")
    try:
        asyncio.run(control_plane(args, rep, state, creds, app_dir))
        workload(args, rep, state, creds)
    except Exception as exc:
        rep.check("completed", False, error=f"{type(exc).__name__}: {exc}"[:800])
        for name in ("router", "agent"):
            path = root / "stack" / "logs" / f"{name}.log"
            if path.exists():
                log(f"--- {name}.log (tail)\n" + "\n".join(path.read_text(errors="replace").splitlines()[-40:]))
    finally:
        if args.out:
            for name in ("router", "agent"):
                path = root / "stack" / "logs" / f"{name}.log"
                if path.exists():
                    (args.out / f"{name}.log").write_text(path.read_text(errors="replace")[-400_000:])
        Stack.down(root / "stack")
    rep.emit("failed_checks", rep.failed, "")
    return 1 if rep.failed else 0


if __name__ == "__main__":
    raise SystemExit(main())

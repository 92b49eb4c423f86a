"""What the agent's NVML probe reads off a real GPU while a bf16 matmul loop runs on it (the figures behind
``duanflow_agent_gpu_utilization_percent`` and ``duanflow_agent_gpu_memory_used_mib``).

``python bench/gpu_nvml.py [--seconds 5] [--gpu 0]`` on a GPU host with torch and nvidia-ml-py: reads the
inventory once idle, then samples it every 0.2 s while a thread keeps the GPU busy, then idle again. Prints one
JSON line per figure (``{"bench": "gpu_nvml", "metric": ..., "value": ..., "unit": ...}``) and exits 1 when NVML is
absent or the busy utilisation does not rise above the idle one.
"""

from __future__ import annotations

import argparse
import importlib
import json
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

for src in ("proto/src", "services/agent/src"):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / src))

from duanflow_agent.adapters.nvml import NvmlProbe  # noqa: E402


def emit(metric: str, value: Any, unit: str, **extra: str) -> None:
    print(json.dumps({"bench": "gpu_nvml", "metric": metric, "value": value, "unit": unit, **extra}), flush=True)


def busy(gpu: int, running: threading.Event, stop: threading.Event) -> None:
    torch: Any = importlib.import_module("torch")  # only on GPU hosts
    dev = torch.device(f"cuda:{gpu}")
    a = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
    while not stop.is_set():
        for _ in range(20):
            a = (a @ b) * 1e-3
        torch.cuda.synchronize(dev)
        running.set()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--gpu", type=int, default=0)
    args = parser.parse_args()

    probe = NvmlProbe()
    idle = probe.read()
    if idle is None or not idle.gpus:
        emit("nvml", None, "", error="NVML reports no GPU here")
        return 1
    card = idle.gpus[args.gpu]
    emit("card", card.name, "", memory_mb=str(card.memory_total_mb), driver=idle.driver_version, cuda=idle.cuda_version)
    emit("idle_utilization", card.utilization_pct, "%")
    emit("idle_memory_used", card.memory_used_mb, "MiB")

    running, stop = threading.Event(), threading.Event()
    worker = threading.Thread(target=busy, args=(args.gpu, running, stop), daemon=True)
    worker.start()
    if not running.wait(120):  # importing torch and the first kernels take seconds on a fresh host
        emit("busy", None, "", error="the matmul loop did not start within 120 s")
        return 1
    time.sleep(1.0)  # NVML averages utilisation over its last sample period
    utils: list[int] = []
    mems: list[int] = []
    deadline = time.monotonic() + args.seconds
    while time.monotonic() < deadline:
        inv = probe.read()
        assert inv is not None
        utils.append(inv.gpus[args.gpu].utilization_pct)
        mems.append(inv.gpus[args.gpu].memory_used_mb)
        time.sleep(0.2)
    stop.set()
    worker.join()
    emit("busy_utilization_median", statistics.median(utils), "%", samples=str(len(utils)))
    emit("busy_utilization_max", max(utils), "%")
    emit("busy_memory_used_max", max(mems), "MiB")
    ok = statistics.median(utils) > card.utilization_pct and max(mems) > card.memory_used_mb
    emit("utilization_tracks_load", ok, "")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

"""GPU inventory through NVML (``nvidia-ml-py``); None when the host has no NVIDIA driver."""

from __future__ import annotations

import logging
from typing import Any

from duanflow_proto.messages.agent import GpuInfo

from duanflow_agent import catalog
from duanflow_agent.domain import Inventory

log = logging.getLogger("duanflow.agent.nvml")

MIB = 1024 * 1024


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class NvmlProbe:
    """Reads GPUs with NVML; initialises once and remembers when NVML is absent."""

    def __init__(self) -> None:
        self._nvml: Any = None
        self._absent = False

    def _init(self) -> Any:
        if self._nvml is None and not self._absent:
            try:
                import pynvml

                pynvml.nvmlInit()
                self._nvml = pynvml
            except Exception as exc:  # no driver, no library: a CPU host
                log.info("NVML not available (%s): no physical GPUs", exc)
                self._absent = True
        return self._nvml

    def read(self) -> Inventory | None:
        """The GPUs now, or None without NVML."""
        nv = self._init()
        if nv is None:
            return None
        gpus: list[GpuInfo] = []
        for index in range(nv.nvmlDeviceGetCount()):
            gpus.append(self._gpu(nv, index))
        driver = cuda = ""
        try:
            driver = _text(nv.nvmlSystemGetDriverVersion())
            version = int(nv.nvmlSystemGetCudaDriverVersion())
            cuda = f"{version // 1000}.{(version % 1000) // 10}"
        except Exception as exc:
            log.debug("NVML version query failed: %s", exc)
        return Inventory(gpus=tuple(gpus), simulated=False, driver_version=driver, cuda_version=cuda)

    @staticmethod
    def _gpu(nv: Any, index: int) -> GpuInfo:
        handle = nv.nvmlDeviceGetHandleByIndex(index)
        name = _text(nv.nvmlDeviceGetName(handle))
        uuid = _text(nv.nvmlDeviceGetUUID(handle))
        healthy = True
        total = used = util = temp = 0
        try:
            mem = nv.nvmlDeviceGetMemoryInfo(handle)
            total, used = int(mem.total) // MIB, int(mem.used) // MIB
        except Exception:
            healthy = False
        try:
            util = int(nv.nvmlDeviceGetUtilizationRates(handle).gpu)
        except Exception:
            util = 0  # not supported on every board (MIG, some vGPUs)
        try:
            temp = int(nv.nvmlDeviceGetTemperature(handle, nv.NVML_TEMPERATURE_GPU))
        except Exception:
            temp = 0
        return GpuInfo(
            index=index,
            uuid=uuid,
            gpu_type=catalog.canonical(name, total),
            name=name,
            memory_total_mb=total,
            memory_used_mb=used,
            utilization_pct=util,
            temperature_c=temp,
            healthy=healthy,
        )

"""Concurrent job placements on one host: each reserves its GPUs before the next decides, so none share one."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from duanflow_proto.errors import NoCapacityError
from duanflow_proto.messages.agent import CapacityReport, GpuInfo, StartReplica, StartReplicaReply
from duanflow_proto.messages.release import AppSpec, FunctionSpec, Release
from duanflow_router.control import ControlPlane
from duanflow_router.ports import ReplicaRecord
from duanflow_router.replica_setup import ReplicaExtras

FN = FunctionSpec(name="hold", gpu=["H100"], gpu_count=2)
RELEASE = Release(
    release_id="rel_1",
    app="a",
    env="e",
    created_ms=1,
    bundle_key="k",
    bundle_digest="0" * 64,
    image_id="",
    spec=AppSpec(name="a", module="m", functions=[FN]),
)
REPORT = CapacityReport(
    agent_id="ag-1",
    host="h",
    gpus=[GpuInfo(index=i, uuid=f"u{i}", gpu_type="H100", memory_total_mb=81559) for i in range(4)],
)


class Fakes:
    """Store, agents and platform of one control plane; every call yields to the loop, as real I/O does."""

    docker_registry = ""
    """As a ReplicaSetup: no docker on this stack."""

    def __init__(self) -> None:
        self.started: list[StartReplica] = []

    async def for_replica(self, release: Release, fn: FunctionSpec) -> ReplicaExtras:
        await asyncio.sleep(0.01)  # a secrets query: other placements run meanwhile
        return ReplicaExtras(env_vars={})

    async def capacity_reports(self) -> list[CapacityReport]:
        await asyncio.sleep(0)
        return [REPORT]

    async def record_replica(self, replica: ReplicaRecord) -> None:
        await asyncio.sleep(0)

    async def set_replica_state(self, replica_id: str, state: str) -> None:
        await asyncio.sleep(0)

    async def publish_decision(self, decision: Any) -> None:
        await asyncio.sleep(0)

    async def publish_log(self, line: Any) -> None:
        await asyncio.sleep(0)

    async def start_replica(self, agent_id: str, command: StartReplica, timeout_s: float) -> StartReplicaReply:
        self.started.append(command)
        await asyncio.sleep(0.05)
        return StartReplicaReply(replica_id=command.replica_id, agent_id=agent_id, pid=1)


async def test_concurrent_job_placements_never_pick_the_same_gpus() -> None:
    fakes: Any = Fakes()
    control = ControlPlane(fakes, fakes, fakes, fakes)
    control.setup = fakes
    seen: list[ReplicaRecord] = []

    async def place(job_id: str) -> ReplicaRecord | None:
        try:
            rec, _ = await control._start_one(RELEASE, FN, "url", job_id=job_id, on_reserved=seen.append)
        except NoCapacityError:
            return None
        return rec

    got = await asyncio.gather(*(place(f"jb-{i:08x}") for i in range(3)))
    placed = [r for r in got if r is not None]
    assert len(placed) == 2 and got.count(None) == 1, got
    a, b = (set(r.gpu_indices) for r in placed)
    assert len(a) == len(b) == 2 and not a & b
    assert [set(c.gpu_indices) for c in fakes.started] == [a, b]
    assert [r.replica_id for r in seen] == [r.replica_id for r in placed]
    with pytest.raises(NoCapacityError):
        await control._start_one(RELEASE, FN, "url", job_id="jb-000000ff")

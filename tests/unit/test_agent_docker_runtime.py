"""The supervisor's docker path over in-memory ports: which runtime, the container's env, mounts and GPUs."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from duanflow_agent import domain
from duanflow_agent.ports import LineSink
from duanflow_agent.supervisor import Supervisor
from duanflow_proto.errors import InvalidInputError
from duanflow_proto.messages.agent import GpuInfo, StartReplica, StopReplica

pytestmark = pytest.mark.timeout(10)

IMAGE = "127.0.0.1:5000/duanflow/images:im-000000000000000000000001"


class Proc:
    pid = 4242

    def __init__(self) -> None:
        self.exit: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    async def wait(self) -> int:
        return await asyncio.shield(self.exit)

    async def stop(self, grace_s: float) -> int:
        if not self.exit.done():
            self.exit.set_result(0)
        return await self.wait()


@dataclass
class Started:
    image: str
    argv: list[str]
    name: str
    cwd: Path
    env: dict[str, str]
    binds: list[Path]
    gpus: list[int]


@dataclass
class Ports:
    bundle: Path
    fetched: int = 0
    processes: int = 0
    containers: list[Started] = field(default_factory=list)
    ready: dict[str, asyncio.Future[None]] = field(default_factory=dict)

    async def fetch(self, url: str, digest: str) -> Path:
        self.fetched += 1
        return self.bundle

    async def spawn(self, argv: list[str], *, cwd: Path, env: Mapping[str, str], on_line: LineSink) -> Proc:
        self.processes += 1
        self.ready[env["DUANFLOW_REPLICA_ID"]].set_result(None)
        return Proc()

    @asynccontextmanager
    async def listen(self, replica_id: str) -> AsyncIterator[Awaitable[None]]:
        self.ready[replica_id] = asyncio.get_running_loop().create_future()
        yield self.ready[replica_id]


@dataclass
class Containers:
    ports: Ports

    async def spawn(
        self,
        image: str,
        argv: list[str],
        *,
        name: str,
        cwd: Path,
        env: Mapping[str, str],
        binds: Sequence[Path],
        gpu_indices: Sequence[int],
        on_line: LineSink,
    ) -> Proc:
        self.ports.containers.append(Started(image, argv, name, cwd, dict(env), list(binds), list(gpu_indices)))
        self.ports.ready[name].set_result(None)
        return Proc()


class Log:
    def __init__(self, path: Path) -> None:
        self.path = path

    def write(self, stream: str, line: str) -> None:
        pass

    def close(self) -> None:
        pass


def real_gpus(n: int) -> domain.Inventory:
    return domain.Inventory(gpus=tuple(GpuInfo(index=i, uuid=f"GPU-{i}", gpu_type="H100") for i in range(n)))


def make(ports: Ports, inventory: domain.Inventory, *, docker: bool) -> Supervisor:
    return Supervisor(
        agent_id="ag-test",
        inventory=inventory,
        bundles=ports,
        spawner=ports,
        ready=ports,
        sinks=lambda cmd, also: also,
        open_log=Log,
        work_dir=ports.bundle.parent,
        argv=["/host/venv/bin/python", "-m", "duanflow._runtime"],
        base_env={"PATH": "/host/venv/bin", "HOME": "/root", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"},
        nats_url="nats://127.0.0.1:4222",
        nats_user="agent",
        nats_password="pw",
        containers=Containers(ports) if docker else None,
        container_argv=["python", "-m", "duanflow._runtime"],
    )


def cmd(rid: str, gpus: list[int], image: str = IMAGE) -> StartReplica:
    return StartReplica(
        replica_id=rid,
        env="main",
        app="demo",
        release="rel_1",
        function="f",
        module="app",
        bundle_url="http://b",
        bundle_digest="ab" * 32,
        stream="S",
        consumer="c",
        gpu_indices=gpus,
        env_vars={"USER_VAR": "1"},
        docker_image=image,
    )


async def test_a_docker_replica_runs_as_a_container_with_its_gpus(tmp_path: Path) -> None:
    ports = Ports(bundle=tmp_path / "bundle")
    sup = make(ports, real_gpus(4), docker=True)
    async with sup.running(1.0):
        reply = await sup.start(cmd("rp-a", [2, 3]))
        assert reply.pid == 4242 and ports.processes == 0
        (c,) = ports.containers
        assert (c.image, c.argv, c.name, c.cwd) == (IMAGE, ["python", "-m", "duanflow._runtime"], "rp-a", ports.bundle)
        assert c.binds == [ports.bundle] and c.gpus == [2, 3]
        # the image's PATH and HOME, not the agent host's; its two GPUs are 0 and 1 inside the container
        assert "PATH" not in c.env and "HOME" not in c.env
        # tracing follows the agent's setting into the container (the process runtime inherits it)
        assert c.env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://127.0.0.1:4318"
        assert c.env["CUDA_VISIBLE_DEVICES"] == "0,1" and c.env["DUANFLOW_REPLICA_ID"] == "rp-a"
        assert c.env["PYTHONPATH"] == str(ports.bundle) and c.env["USER_VAR"] == "1"
        await sup.stop(StopReplica(replica_id="rp-a"))
        # a replica without an image still runs as a process
        await sup.start(cmd("rp-b", [], image=""))
        assert ports.processes == 1 and len(ports.containers) == 1


async def test_simulated_gpus_get_no_device_request(tmp_path: Path) -> None:
    ports = Ports(bundle=tmp_path / "bundle")
    sup = make(ports, domain.declared_inventory("H100:2"), docker=True)
    async with sup.running(1.0):
        await sup.start(cmd("rp-a", [1]))
        (c,) = ports.containers
        assert c.gpus == [] and c.env["DUANFLOW_SIMULATED_GPU"] == "1" and c.env["CUDA_VISIBLE_DEVICES"] == ""


async def test_an_agent_without_docker_refuses_a_docker_replica_before_downloading(tmp_path: Path) -> None:
    ports = Ports(bundle=tmp_path / "bundle")
    sup = make(ports, real_gpus(1), docker=False)
    async with sup.running(1.0):
        with pytest.raises(InvalidInputError, match="DUANFLOW_AGENT_DOCKER_HOST"):
            await sup.start(cmd("rp-a", [0]))
        assert ports.fetched == 0 and sup.live_count() == 0

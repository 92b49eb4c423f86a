"""The agent's supervisor over in-memory ports: start/stop races, GPU reservation, duplicate starts, shutdown."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Mapping
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from duanflow_agent import domain
from duanflow_agent.ports import LineSink
from duanflow_agent.supervisor import Supervisor
from duanflow_proto.errors import ConflictError, RemoteError, UnavailableError
from duanflow_proto.messages.agent import StartReplica, StopReplica
from fixtures.waiting import eventually

pytestmark = pytest.mark.timeout(10)


class FakeProc:
    def __init__(self, pid: int, on_line: LineSink) -> None:
        self.pid = pid
        self.on_line = on_line
        self.exit: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.signals: list[str] = []

    async def wait(self) -> int:
        return await asyncio.shield(self.exit)

    async def stop(self, grace_s: float) -> int:
        self.signals.append("TERM")
        if not self.exit.done():
            self.exit.set_result(0)
        return await self.wait()

    def crash(self, code: int) -> None:
        self.on_line("stderr", "Traceback: boom")
        self.exit.set_result(code)


class Fakes:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.download_gate = asyncio.Event()
        self.download_gate.set()
        self.procs: list[FakeProc] = []
        self.ready_on_spawn = True
        self.crash_on_spawn: int | None = None
        self._ready: dict[str, asyncio.Future[None]] = {}
        self.lines: list[tuple[str, str, str]] = []

    async def fetch(self, url: str, digest: str) -> Path:
        await self.download_gate.wait()
        return self.tmp

    async def spawn(self, argv: list[str], *, cwd: Path, env: Mapping[str, str], on_line: LineSink) -> FakeProc:
        proc = FakeProc(1000 + len(self.procs), on_line)
        self.procs.append(proc)
        rid = env["DUANFLOW_REPLICA_ID"]
        if self.crash_on_spawn is not None:
            proc.crash(self.crash_on_spawn)
        elif self.ready_on_spawn:
            self._ready[rid].set_result(None)
        return proc

    @asynccontextmanager
    async def listen(self, replica_id: str) -> AsyncIterator[Awaitable[None]]:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._ready[replica_id] = fut
        yield fut

    def sink(self, cmd: StartReplica, also: LineSink) -> LineSink:
        def on_line(stream: str, line: str) -> None:
            also(stream, line)
            self.lines.append((cmd.replica_id, stream, line))

        return on_line


class MemLog:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.lines: list[str] = []
        self.closed = False

    def write(self, stream: str, line: str) -> None:
        self.lines.append(f"{stream} {line}")

    def close(self) -> None:
        self.closed = True


def make(tmp_path: Path, fakes: Fakes, timeout_s: float = 5.0) -> Supervisor:
    return Supervisor(
        agent_id="ag-test",
        inventory=domain.declared_inventory("H100:2"),
        bundles=fakes,
        spawner=fakes,
        ready=fakes,
        sinks=fakes.sink,
        open_log=MemLog,
        work_dir=tmp_path,
        argv=["python", "-m", "runtime"],
        base_env={},
        nats_url="nats://x",
        nats_user="agent",
        nats_password="pw",
        start_timeout_s=timeout_s,
    )


def cmd(rid: str, gpus: list[int] | None = None) -> StartReplica:
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
        gpu_indices=gpus or [],
    )


async def test_start_then_stop(tmp_path: Path) -> None:
    fakes = Fakes(tmp_path)
    sup = make(tmp_path, fakes)
    async with sup.running(1.0):
        reply = await sup.start(cmd("rp-a", [0]))
        assert reply.pid == 1000 and sup.live_count() == 1
        ack = await sup.stop(StopReplica(replica_id="rp-a"))
        assert "exited with code 0" in ack.message and sup.live_count() == 0
        assert fakes.procs[0].signals == ["TERM"]


async def test_gpus_are_reserved_before_the_bundle_arrives(tmp_path: Path) -> None:
    fakes = Fakes(tmp_path)
    fakes.download_gate.clear()
    sup = make(tmp_path, fakes)
    async with sup.running(1.0):
        first = asyncio.create_task(sup.start(cmd("rp-a", [1])))
        await asyncio.sleep(0)
        with pytest.raises(ConflictError, match="rp-a"):
            await sup.start(cmd("rp-b", [1]))
        fakes.download_gate.set()
        assert (await first).replica_id == "rp-a"
        assert len(fakes.procs) == 1


async def test_duplicate_starts_spawn_once(tmp_path: Path) -> None:
    fakes = Fakes(tmp_path)
    fakes.download_gate.clear()
    sup = make(tmp_path, fakes)
    async with sup.running(1.0):
        a = asyncio.create_task(sup.start(cmd("rp-a")))
        b = asyncio.create_task(sup.start(cmd("rp-a")))
        await asyncio.sleep(0)
        fakes.download_gate.set()
        ra, rb = await asyncio.gather(a, b)
        assert ra == rb and len(fakes.procs) == 1


async def test_stop_while_downloading_cancels_the_start(tmp_path: Path) -> None:
    fakes = Fakes(tmp_path)
    fakes.download_gate.clear()
    sup = make(tmp_path, fakes)
    async with sup.running(1.0):
        start = asyncio.create_task(sup.start(cmd("rp-a", [0])))
        await asyncio.sleep(0)
        ack = await sup.stop(StopReplica(replica_id="rp-a"))
        assert "before it started" in ack.message
        fakes.download_gate.set()
        with pytest.raises(ConflictError, match="stopped before it started"):
            await start
        assert fakes.procs == [] and "rp-a" not in sup.replicas
        assert (await sup.start(cmd("rp-b", [0]))).pid == 1000, "the GPU is free again"


async def test_crash_before_ready_is_an_error_and_frees_the_gpu(tmp_path: Path) -> None:
    fakes = Fakes(tmp_path)
    fakes.crash_on_spawn = 2
    sup = make(tmp_path, fakes)
    async with sup.running(1.0):
        with pytest.raises(RemoteError) as info:
            await sup.start(cmd("rp-a", [0]))
        assert "exited with code 2" in info.value.message and "Traceback: boom" in info.value.message
        assert info.value.details["log_path"] == str(tmp_path / "logs" / "rp-a.log")
        assert sup.live_count() == 0
        fakes.crash_on_spawn = None
        assert (await sup.start(cmd("rp-b", [0]))).pid > 0


async def test_crash_after_ready_is_announced(tmp_path: Path) -> None:
    fakes = Fakes(tmp_path)
    sup = make(tmp_path, fakes)
    async with sup.running(1.0):
        await sup.start(cmd("rp-a", [0]))
        fakes.procs[0].crash(139)

        async def exited() -> bool:
            return sup.replicas["rp-a"].state == domain.EXITED

        await eventually(exited, timeout=2)
        assert sup.live_count() == 0
        notes = [line for rid, stream, line in fakes.lines if stream == domain.AGENT_STREAM]
        assert len(notes) == 1 and "exited with code 139 unexpectedly" in notes[0]


async def test_closing_stops_every_replica_and_refuses_new_starts(tmp_path: Path) -> None:
    fakes = Fakes(tmp_path)
    sup = make(tmp_path, fakes)
    async with sup.running(1.0):
        await sup.start(cmd("rp-a", [0]))
        await sup.start(cmd("rp-b", [1]))
        await sup.start(cmd("rp-c"))
    assert all(p.signals == ["TERM"] and p.exit.done() for p in fakes.procs) and len(fakes.procs) == 3
    assert sup.live_count() == 0
    with pytest.raises(UnavailableError, match="shutting down"):
        await sup.start(cmd("rp-d"))

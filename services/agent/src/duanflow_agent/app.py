"""Wiring of the agent: inventory, supervisor, NATS handlers, the capacity report loop, clean shutdown."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import msgspec
import psutil
from duanflow_kit import telemetry
from duanflow_kit.service import Service, stop_tasks
from duanflow_proto import codec, subjects
from duanflow_proto.errors import InvalidInputError
from duanflow_proto.messages.agent import CapacityReport, StartReplica
from nats.js.kv import KeyValue

from duanflow_agent import domain, handlers
from duanflow_agent.adapters.bundles import HttpBundleStore
from duanflow_agent.adapters.containers import DockerSpawner
from duanflow_agent.adapters.images import HttpImageCache
from duanflow_agent.adapters.logfile import open_log
from duanflow_agent.adapters.nats import LogRelay, NatsReadySignal
from duanflow_agent.adapters.nvml import NvmlProbe
from duanflow_agent.adapters.process import ProcessSpawner
from duanflow_agent.metrics import agent_metrics
from duanflow_agent.ports import GpuProbe, LineSink
from duanflow_agent.settings import Settings, child_env
from duanflow_agent.supervisor import Supervisor

log = logging.getLogger("duanflow.agent")

MIB = 1024 * 1024


class _LateRelay:
    """Sink factory bound to the log relay once the NATS connection exists."""

    relay: LogRelay | None = None

    def __call__(self, cmd: StartReplica, also: LineSink) -> LineSink:
        assert self.relay is not None, "agent not started"
        return self.relay.sink(cmd, also)


class _LateReady:
    """Ready signal bound to the NATS connection once it exists."""

    signal: NatsReadySignal | None = None

    def listen(self, replica_id: str) -> AbstractAsyncContextManager[Awaitable[None]]:
        assert self.signal is not None, "agent not started"
        return self.signal.listen(replica_id)


@dataclass
class AgentApp:
    """The wired agent: its service (NATS, health, handlers), supervisor and lifespan."""

    service: Service
    supervisor: Supervisor
    lifespan: Callable[[Service], AbstractAsyncContextManager[None]]

    async def run(self) -> None:
        """Run until SIGTERM/SIGINT, then stop every replica."""
        await self.service.run(self.lifespan)


def resolve_inventory(settings: Settings, probe: GpuProbe) -> domain.Inventory:
    """The inventory to report: declared, read through NVML, simulated, or none."""
    probed = None if settings.gpus.strip() else probe.read()
    try:
        return domain.choose_inventory(probed=probed, declared=settings.gpus, simulate=settings.simulate)
    except InvalidInputError as exc:
        raise SystemExit(f"DUANFLOW_AGENT_GPUS: {exc}") from None


def _python_of(python: str) -> str:
    """``major.minor`` of the interpreter that runs replicas (images must match it)."""
    if not python:
        return f"{sys.version_info.major}.{sys.version_info.minor}"
    try:
        out = subprocess.run(
            [python, "-c", "import sys; print(f'{sys.version_info[0]}.{sys.version_info[1]}')"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        raise SystemExit(f"DUANFLOW_AGENT_PYTHON={python!r} cannot run: {exc}") from None
    return out.stdout.strip()


def build_app(settings: Settings, probe: GpuProbe | None = None) -> AgentApp:
    """The agent, wired from its settings (``probe`` replaces NVML in tests)."""
    probe = probe or NvmlProbe()
    try:
        agent_id = domain.default_agent_id(socket.gethostname())
        if settings.agent_id:
            agent_id = subjects.token(settings.agent_id)
    except ValueError as exc:
        raise SystemExit(f"DUANFLOW_AGENT_AGENT_ID: {exc}") from None
    inventory = resolve_inventory(settings, probe)
    if not settings.runtime_module or not all(p.isidentifier() for p in settings.runtime_module.split(".")):
        raise SystemExit(f"DUANFLOW_AGENT_RUNTIME_MODULE={settings.runtime_module!r} is not a module name")
    for name in ("report_interval_s", "start_timeout_s"):
        if getattr(settings, name) <= 0:
            raise SystemExit(f"DUANFLOW_AGENT_{name.upper()} must be positive, not {getattr(settings, name)}")
    if settings.runtime != "process":
        raise SystemExit(f"DUANFLOW_AGENT_RUNTIME={settings.runtime!r}: only the 'process' runtime is built so far")
    service = Service("agent", settings)
    work_dir = Path(settings.work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    sinks = _LateRelay()
    ready = _LateReady()
    images = HttpImageCache(work_dir, settings.image_cache_mb * 1024 * 1024, python=_python_of(settings.python))
    containers = DockerSpawner(settings.docker_host, agent_id=agent_id) if settings.docker_host else None
    supervisor = Supervisor(
        agent_id=agent_id,
        inventory=inventory,
        bundles=HttpBundleStore(work_dir),
        spawner=ProcessSpawner(),
        ready=ready,
        sinks=sinks,
        open_log=open_log,
        work_dir=work_dir,
        argv=[settings.python or sys.executable, "-m", settings.runtime_module],
        base_env=child_env(),
        nats_url=settings.nats_url,
        nats_user=settings.replica_nats_user or settings.nats_user,
        nats_password=settings.replica_nats_password or settings.nats_password,
        start_timeout_s=settings.start_timeout_s,
        exited_keep_s=settings.exited_keep_s,
        images=images,
        containers=containers,
        container_argv=[settings.docker_python, "-m", settings.runtime_module],
    )
    images.busy = lambda: {r.cmd.image_id for r in supervisor.replicas.values() if r.state != domain.EXITED}
    handlers.register(service, supervisor)

    @asynccontextmanager
    async def lifespan(svc: Service) -> AsyncIterator[None]:
        if containers is not None:
            # containers a crashed run of this agent left behind hold GPUs and consume invocations: remove them
            left = await asyncio.to_thread(containers.remove_leftovers)
            if left:
                log.warning("removed %d replica container(s) left by an earlier run of %s", left, agent_id)
        relay = LogRelay(svc.nc, settings.log_buffer_lines)
        sinks.relay = relay
        ready.signal = NatsReadySignal(svc.nc)
        log.info(
            "agent %s: %d GPU(s)%s %s",
            agent_id,
            len(inventory.gpus),
            " (simulated)" if inventory.simulated else "",
            ",".join(g.gpu_type for g in inventory.gpus) or "CPU only",
        )
        gauges = agent_metrics(telemetry.metrics())
        gauges.supervisor = supervisor
        async with asyncio.TaskGroup() as tg:
            relay_task = tg.create_task(relay.run())
            report_task = tg.create_task(_report_loop(svc, supervisor, settings, probe))
            try:
                async with supervisor.running(settings.shutdown_grace_s):
                    yield
            finally:
                gauges.supervisor = None
                await stop_tasks(report_task)
                await relay.flush()
                await stop_tasks(relay_task)
                await _withdraw(svc, agent_id, settings.capacity_kv)

    return AgentApp(service=service, supervisor=supervisor, lifespan=lifespan)


async def _report_loop(svc: Service, sup: Supervisor, settings: Settings, probe: GpuProbe) -> None:
    subject = subjects.capacity(sup.agent_id)
    host = socket.gethostname()
    cpu_count = psutil.cpu_count() or os.cpu_count() or 1
    memory_mb = int(psutil.virtual_memory().total) // MIB
    live_nvml = not sup.inventory.simulated and bool(sup.inventory.gpus)
    kv: KeyValue | None = None
    while True:
        if live_nvml:
            try:
                fresh = await asyncio.to_thread(probe.read)
                if fresh is not None:
                    sup.inventory = fresh
            except Exception as exc:
                log.warning("NVML read failed: %s", exc)
        sup.prune()
        report = domain.capacity_report(
            agent_id=sup.agent_id,
            host=host,
            region=settings.region,
            labels=dict(settings.labels),
            inventory=sup.inventory,
            cpu_count=cpu_count,
            memory_mb=memory_mb,
            prices=dict(settings.prices),
            replicas=domain.live_replicas(sup.replicas.values()),
            ts_ms=time.time_ns() // 1_000_000,
            interval_s=settings.report_interval_s,
        )
        if sup.images is not None:
            report = msgspec.structs.replace(report, cached_images=sup.images.cached())
        report = msgspec.structs.replace(report, runtimes=runtimes(sup))
        data = codec.encode(report)
        try:
            await svc.nc.publish(subject, data)
        except Exception as exc:
            log.warning("capacity report not published: %s", exc)
        if settings.capacity_kv:
            try:
                if kv is None:
                    kv = await svc.js.key_value(subjects.KV_CAPACITY)
                await kv.put(subjects.token(sup.agent_id), data)
            except Exception as exc:
                log.warning("capacity report not stored in %s: %s", subjects.KV_CAPACITY, exc)
        await asyncio.sleep(settings.report_interval_s)


def runtimes(sup: Supervisor) -> list[str]:
    """The runtimes the capacity report lists: ``process``, and ``docker`` when it is configured."""
    return ["process", "docker"] if sup.containers is not None else ["process"]


async def _withdraw(svc: Service, agent_id: str, capacity_kv: bool) -> None:
    """A stopping agent says so (a ``leaving`` report, after every report it sent) and takes its report out of the
    capacity bucket, instead of waiting for the TTL or the missed beats."""
    leaving = CapacityReport(
        agent_id=agent_id, host=socket.gethostname(), leaving=True, ts_ms=time.time_ns() // 1_000_000
    )
    try:
        await svc.nc.publish(subjects.capacity(agent_id), codec.encode(leaving))
        await svc.nc.flush(timeout=2)
    except Exception as exc:
        log.warning("leaving report of %s not published: %s", agent_id, exc)
    if not capacity_kv:
        return
    try:
        kv = await svc.js.key_value(subjects.KV_CAPACITY)
        await kv.delete(subjects.token(agent_id))
    except Exception as exc:
        log.warning("capacity report of %s not withdrawn: %s", agent_id, exc)

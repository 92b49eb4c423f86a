"""The agent's use cases: start, stop and watch replicas, and describe the host; I/O only through ports."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

from duanflow_proto.errors import ConflictError, InternalError, InvalidInputError, NotFoundError, UnavailableError
from duanflow_proto.messages.agent import StartReplica, StartReplicaReply, StopReplica
from duanflow_proto.messages.common import Ack

from duanflow_agent import domain, image_rules
from duanflow_agent.domain import EXITED, READY, STARTING, STOPPING, Inventory, Replica
from duanflow_agent.ports import (
    BundleStore,
    ContainerSpawner,
    ImageFetcher,
    LineSink,
    LogOpener,
    ReadySignal,
    ReplicaLog,
    ReplicaProcess,
    Spawner,
)

log = logging.getLogger("duanflow.agent")

SinkFactory = Callable[[StartReplica, LineSink], LineSink]


class Supervisor:
    """Owns the replicas of one agent: their processes, readiness, exits and shutdown."""

    def __init__(
        self,
        *,
        agent_id: str,
        inventory: Inventory,
        bundles: BundleStore,
        spawner: Spawner,
        ready: ReadySignal,
        sinks: SinkFactory,
        open_log: LogOpener,
        work_dir: Path,
        argv: list[str],
        base_env: dict[str, str],
        nats_url: str,
        nats_user: str,
        nats_password: str,
        start_timeout_s: float = 120.0,
        exited_keep_s: float = 60.0,
        images: ImageFetcher | None = None,
        containers: ContainerSpawner | None = None,
        container_argv: list[str] | None = None,
    ) -> None:
        self.agent_id = agent_id
        self.inventory = inventory
        self._bundles = bundles
        self._spawner = spawner
        self._ready = ready
        self._sinks = sinks
        self._open_log = open_log
        self._work_dir = work_dir
        self._argv = argv
        self._base_env = base_env
        self._nats = (nats_url, nats_user, nats_password)
        self._start_timeout_s = start_timeout_s
        self._exited_keep_s = exited_keep_s
        self.replicas: dict[str, Replica] = {}
        self._procs: dict[str, ReplicaProcess] = {}
        self._exited: dict[str, asyncio.Event] = {}
        self._starts: dict[str, asyncio.Future[StartReplicaReply]] = {}
        self._tg: asyncio.TaskGroup | None = None
        self._closing = False
        self.images = images
        """Venv images by id; None: replicas run in the agent's own environment only."""
        self.containers = containers
        """The docker runtime; None: replicas whose command names a docker image are refused."""
        self._container_argv = container_argv or ["python", "-m", "duanflow._runtime"]

    @asynccontextmanager
    async def running(self, shutdown_grace_s: float) -> AsyncIterator[Supervisor]:
        """Watch replicas while open; on close stop every replica (no orphans) and wait for their exits."""
        async with asyncio.TaskGroup() as tg:
            self._tg = tg
            self._closing = False
            try:
                yield self
            finally:
                self._closing = True
                await self.stop_all(shutdown_grace_s)
                self._tg = None

    def log_path(self, replica_id: str) -> Path:
        """The on-disk log of one replica."""
        return Path(domain.replica_log_path(self._work_dir, replica_id))

    # -- commands ---------------------------------------------------------------------------------------

    async def start(self, cmd: StartReplica) -> StartReplicaReply:
        """Start one replica and answer once it announced readiness (idempotent per replica id)."""
        domain.validate_start(cmd, self.inventory)
        pending = self._starts.get(cmd.replica_id)
        if pending is not None:
            return await asyncio.shield(pending)
        existing = self.replicas.get(cmd.replica_id)
        if existing is not None and existing.state == READY:
            return self._reply(existing, 0)
        if existing is not None and existing.state == STOPPING:
            raise ConflictError(f"replica {cmd.replica_id} is stopping; start it under a new replica id")
        if self._tg is None or self._closing:
            raise UnavailableError(f"agent {self.agent_id} is shutting down")
        domain.check_gpus_free(cmd, self.replicas.values())
        # Registered before the first await: the GPUs are reserved against concurrent starts.
        rec = Replica(cmd=cmd)
        self.replicas[cmd.replica_id] = rec
        fut: asyncio.Future[StartReplicaReply] = asyncio.get_running_loop().create_future()
        self._starts[cmd.replica_id] = fut
        try:
            reply = await self._start(rec)
            fut.set_result(reply)
            return reply
        except BaseException as exc:
            if rec.pid == 0 and self.replicas.get(cmd.replica_id) is rec:
                del self.replicas[cmd.replica_id]  # never spawned: nothing to report, GPUs free again
            fut.set_exception(exc)
            fut.exception()  # retrieved: no "never retrieved" warning when nobody else waited
            raise
        finally:
            del self._starts[cmd.replica_id]

    async def _start(self, rec: Replica) -> StartReplicaReply:
        cmd = rec.cmd
        if cmd.docker_image and self.containers is None:
            raise InvalidInputError(
                f"replica {cmd.replica_id} runs in docker image {cmd.docker_image}, but agent {self.agent_id} has "
                "no docker runtime: start it with DUANFLOW_AGENT_DOCKER_HOST set, or deploy with the venv backend",
                details={"agent_id": self.agent_id, "needs": "docker"},
            )
        bundle_dir = await self._bundles.fetch(cmd.bundle_url, cmd.bundle_digest)
        image_paths: list[str] = []
        if cmd.image_url and self.images is not None and not cmd.docker_image:
            image_paths = await self.images.fetch(cmd.image_url, cmd.image_id)
        if rec.state != STARTING:
            raise ConflictError(f"replica {cmd.replica_id} was stopped before it started")
        if self._tg is None or self._closing:
            raise UnavailableError(f"agent {self.agent_id} is shutting down")
        real_gpus = bool(cmd.gpu_indices) and not self.inventory.simulated
        env = domain.replica_env(
            cmd,
            # a container's PATH, HOME, ... are its image's, not the agent host's; tracing settings do carry over
            base={k: v for k, v in self._base_env.items() if k.startswith("OTEL_")}
            if cmd.docker_image
            else self._base_env,
            bundle_dir=str(bundle_dir),
            nats_url=self._nats[0],
            nats_user=self._nats[1],
            nats_password=self._nats[2],
            simulated_gpu=self.inventory.simulated and bool(cmd.gpu_indices),
        )
        env["PYTHONPATH"] = image_rules.with_image_paths(env["PYTHONPATH"], image_paths)
        env[domain.STARTED_NS_VAR] = str(rec.started_ns)
        log_path = self.log_path(cmd.replica_id)
        logfile = await asyncio.to_thread(self._open_log, log_path)
        tail = rec.stderr_tail

        def keep(stream: str, line: str) -> None:
            logfile.write(stream, line)
            if stream == "stderr":
                tail.append(line)

        on_line = image_rules.masking(self._sinks(cmd, keep), image_rules.secret_values(cmd.env_vars, cmd.secret_keys))
        exited = asyncio.Event()
        async with self._ready.listen(cmd.replica_id) as ready:
            try:
                if cmd.docker_image:
                    assert self.containers is not None
                    if real_gpus:  # the container sees only its own GPUs, numbered from 0
                        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in range(len(cmd.gpu_indices)))
                    proc = await self.containers.spawn(
                        cmd.docker_image,
                        self._container_argv,
                        name=cmd.replica_id,
                        cwd=Path(bundle_dir),
                        env=env,
                        binds=[Path(bundle_dir)],
                        gpu_indices=list(cmd.gpu_indices) if real_gpus else [],
                        on_line=on_line,
                    )
                else:
                    proc = await self._spawner.spawn(self._argv, cwd=Path(bundle_dir), env=env, on_line=on_line)
            except OSError as exc:
                logfile.close()
                raise InternalError(f"could not start {self._argv[0]}: {exc}") from None
            except BaseException:  # the docker engine refused (typed errors from the runtime): close the log
                logfile.close()
                raise
            rec.pid = proc.pid
            self._procs[cmd.replica_id] = proc
            self._exited[cmd.replica_id] = exited
            self._tg.create_task(self._watch(rec, proc, exited, on_line, logfile))
            if self._closing:  # the agent began to stop while this one spawned: do not leave it behind
                rec.state = STOPPING
                await proc.stop(0.0)
                raise UnavailableError(f"agent {self.agent_id} is shutting down")
            ready_task = asyncio.ensure_future(ready)
            exit_task = asyncio.ensure_future(exited.wait())
            try:
                await asyncio.wait(
                    {ready_task, exit_task}, timeout=self._start_timeout_s, return_when=asyncio.FIRST_COMPLETED
                )
            finally:
                for t in (ready_task, exit_task):
                    t.cancel()
            if exited.is_set():
                raise domain.exited_early(rec, log_path)
            if not ready_task.done() or ready_task.cancelled():
                log.warning("replica %s not ready within %gs: stopping it", cmd.replica_id, self._start_timeout_s)
                rec.state = STOPPING
                await proc.stop(5.0)
                await exited.wait()
                raise domain.not_ready_in_time(rec, log_path, self._start_timeout_s)
        rec.state = READY
        ready_ms = int((time.monotonic() - rec.started_at) * 1000)
        log.info("replica %s (%s.%s) ready in %d ms, pid %d", cmd.replica_id, cmd.app, cmd.function, ready_ms, rec.pid)
        return self._reply(rec, ready_ms)

    def _reply(self, rec: Replica, ready_ms: int) -> StartReplicaReply:
        return StartReplicaReply(replica_id=rec.cmd.replica_id, agent_id=self.agent_id, pid=rec.pid, ready_ms=ready_ms)

    async def _watch(
        self, rec: Replica, proc: ReplicaProcess, exited: asyncio.Event, on_line: LineSink, logfile: ReplicaLog
    ) -> None:
        code: int | None = None
        try:
            code = await proc.wait()
        finally:
            rec.exit_code = code
            was = rec.state
            rec.state = EXITED
            rec.exited_at = time.monotonic()
            if was == READY:
                notice = domain.death_notice(rec)
                log.warning("%s", notice.strip("[]"))
                on_line(domain.AGENT_STREAM, notice)
            else:
                logfile.write(domain.AGENT_STREAM, f"[duanflow: replica {domain.exit_description(rec.exit_code)}]")
                log.info("replica %s %s", rec.cmd.replica_id, domain.exit_description(rec.exit_code))
            logfile.close()
            self._procs.pop(rec.cmd.replica_id, None)
            exited.set()

    async def stop(self, cmd: StopReplica) -> Ack:
        """Drain and stop one replica: SIGTERM, SIGKILL after ``grace_s``; answers once it is gone."""
        rec = self.replicas.get(cmd.replica_id)
        if rec is None:
            raise NotFoundError(f"replica {cmd.replica_id} is not on agent {self.agent_id}")
        if cmd.grace_s < 0:
            raise InvalidInputError(f"grace_s must not be negative, not {cmd.grace_s}")
        proc = self._procs.get(cmd.replica_id)
        if proc is None:
            if rec.state == STARTING:  # still downloading its bundle: the start gives up before spawning
                rec.state = STOPPING
                return Ack(message=f"replica {cmd.replica_id} stopped before it started")
            return Ack(message=f"replica {cmd.replica_id} already {domain.exit_description(rec.exit_code)}")
        rec.state = STOPPING
        await proc.stop(cmd.grace_s)
        await self._exited[cmd.replica_id].wait()
        return Ack(message=f"replica {cmd.replica_id} stopped: {domain.exit_description(rec.exit_code)}")

    async def stop_all(self, grace_s: float) -> None:
        """Stop every live replica concurrently (SIGTERM, SIGKILL after ``grace_s``) and wait for their exits."""
        live = list(self._procs.items())
        if not live:
            return
        log.info("stopping %d replica(s)", len(live))
        for rid, _ in live:
            self.replicas[rid].state = STOPPING
        results = await asyncio.gather(*(p.stop(grace_s) for _, p in live), return_exceptions=True)
        for (rid, _), res in zip(live, results, strict=True):
            if isinstance(res, BaseException):
                log.error("stopping replica %s failed: %s", rid, res)
        for rid, _ in live:
            with contextlib.suppress(KeyError):
                await self._exited[rid].wait()

    # -- views ------------------------------------------------------------------------------------------

    def prune(self) -> None:
        """Forget replicas that exited more than ``exited_keep_s`` ago."""
        for rid in domain.forget_exited(self.replicas, time.monotonic(), self._exited_keep_s):
            self.replicas.pop(rid, None)
            self._exited.pop(rid, None)

    def live_count(self) -> int:
        """Replicas starting, ready or stopping."""
        return sum(1 for r in self.replicas.values() if domain.is_live(r))

"""The embedded local stack behind ``duanflow dev``: real NATS, Postgres and S3 on loopback, the five services
and one agent, each in its own session with its own log under ``<data-dir>/logs/``.

Drive it from Python as the CLI does::

    state = Stack.up(data_dir, detach=True)   # returns once every component answers health
    print(Stack.status(data_dir).healthy)
    Stack.down(data_dir)                      # stops every process it started, replicas included
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import fcntl
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO

from duanflow_proto import subjects
from duanflow_proto.messages.common import HealthReply

from duanflow import _config
from duanflow._local import processes, servers
from duanflow._local.health import (
    NatsProbe,
    ServiceDown,
    run_sync,
    wait_healthy,
    wait_http,
)
from duanflow._local.state import (
    KIND_SERVER,
    KIND_SERVICE,
    ComponentState,
    StackCredentials,
    StackState,
    load_or_create_credentials,
    load_state,
    remove_state,
    save_state,
)
from duanflow._local.status import GATEWAY_HEALTH_PATH, StackStatus, check_all

SERVICES: tuple[str, ...] = ("router", "builder", "gateway", "logs", "agent")
"""Services ``up`` starts, in start order (the agent last)."""
BUCKET = "duanflow"
AGENT_ID = "ag-local"
USER_AGENT_SETTINGS = frozenset(
    {"DUANFLOW_AGENT_GPUS", "DUANFLOW_AGENT_SIMULATE", "DUANFLOW_AGENT_REGION", "DUANFLOW_AGENT_PRICES"}
)
"""Agent settings a user may set in the shell of ``duanflow dev up``; every other ``DUANFLOW_*`` is dropped."""
LOCK_FILE = ".stack.lock"

Progress = Callable[[str], None]


class StackError(RuntimeError):
    """The local stack could not do what was asked; the message says what to do."""


class StackRunningError(StackError):
    """``up`` while a stack already runs from the same data dir."""


class ComponentStartError(StackError):
    """One component did not come up; names it, its log and the log's last lines. Everything was torn down."""

    def __init__(self, component: str, log_path: Path, message: str) -> None:
        super().__init__(message)
        self.component = component
        self.log_path = log_path


def default_data_dir() -> Path:
    """``$DUANFLOW_HOME/local``."""
    return _config.home() / "local"


def gpu_visible() -> bool:
    """Whether this machine shows an NVIDIA GPU (``/dev/nvidia0`` or a successful NVML init with a device)."""
    if Path("/dev/nvidia0").exists():
        return True
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            return int(pynvml.nvmlDeviceGetCount()) > 0
        finally:
            pynvml.nvmlShutdown()
    except Exception:
        return False


class Stack:
    """Start, inspect and stop the local stack of one data dir (default ``$DUANFLOW_HOME/local``)."""

    @staticmethod
    def running(data_dir: Path | None = None) -> StackState | None:
        """The state of the stack running from ``data_dir`` (any of its processes alive), else None."""
        state = load_state(_resolve(data_dir))
        if state is None:
            return None
        alive = [c for c in state.components.values() if processes.same_process(c.pid, c.create_time)]
        return state if alive else None

    @staticmethod
    def up(
        data_dir: Path | None = None,
        *,
        detach: bool = True,
        timeout: float = 90.0,
        services: Sequence[str] = SERVICES,
        commands: Mapping[str, Sequence[str]] | None = None,
        write_profile: bool = True,
        progress: Progress | None = None,
    ) -> StackState:
        """Start NATS, Postgres, S3, ``services`` and return once each answers health within ``timeout`` seconds.

        ``detach=False`` records this process as the stack's owner (a foreground ``dev up``, see :meth:`serve`).
        ``commands`` replaces the argv of a service (tests). A component that fails is raised as
        :class:`ComponentStartError` after everything started was torn down.
        """
        data_dir = _resolve(data_dir)
        say = progress or (lambda _msg: None)
        data_dir.mkdir(parents=True, exist_ok=True)
        with _startup_lock(data_dir):
            existing = Stack.running(data_dir)
            if existing is not None:
                raise StackRunningError(_running_message(existing))
            remove_state(data_dir)  # a stale file: its processes are gone
            creds = load_or_create_credentials(data_dir)
            state = StackState(
                data_dir=str(data_dir),
                stack_id=uuid.uuid4().hex,
                started_at=time.time(),
                owner_pid=0 if detach else os.getpid(),
                s3_bucket=BUCKET,
            )
            save_state(state)
            try:
                _start_servers(state, creds, say)
                _start_services(state, creds, services, commands or {}, timeout, say)
            except BaseException:
                say("stopping what was started")
                _teardown(state, grace=5.0)
                remove_state(data_dir)
                raise
            state.status = "running"
            save_state(state)
        if write_profile:
            _config.save_profile(
                _config.LOCAL,
                _config.Profile(
                    nats_url=state.nats_url,
                    nats_user="client",
                    nats_password=creds.nats["client"],
                    env="main",
                    gateway_url=state.gateway_url,
                    s3_endpoint=state.s3_endpoint,
                ),
            )
        return state

    @staticmethod
    def down(data_dir: Path | None = None, *, grace: float = 10.0) -> list[str]:
        """Stop every process of the stack (services and agent first, then S3, Postgres, NATS); remove the state file.

        Returns the names of the components that were running (empty: nothing was running). Idempotent.
        """
        data_dir = _resolve(data_dir)
        state = load_state(data_dir)
        if state is None:
            return []
        was_running = [n for n, c in state.components.items() if processes.same_process(c.pid, c.create_time)]
        state.status = "stopping"
        with contextlib.suppress(OSError):
            save_state(state)
        _teardown(state, grace=grace)
        remove_state(data_dir)
        return was_running

    @staticmethod
    def status(data_dir: Path | None = None, *, timeout: float = 2.0) -> StackStatus:
        """Check each component: its process, and NATS connect / pg_isready / the S3 bucket / each service's health."""
        data_dir = _resolve(data_dir)
        state = load_state(data_dir)
        if state is None:
            return StackStatus(data_dir=str(data_dir), running=False, healthy=False)
        creds = load_or_create_credentials(data_dir)
        comps = run_sync(lambda: check_all(state, creds, timeout))
        running = any(c.alive for c in comps.values())
        healthy = running and state.status == "running" and all(c.healthy for c in comps.values())
        return StackStatus(data_dir=str(data_dir), running=running, healthy=healthy, components=comps)

    @staticmethod
    def serve(state: StackState, *, notify: Progress | None = None, poll: float = 0.5) -> str:
        """Keep a foreground stack until SIGINT/SIGTERM (then stop it) or until ``dev down`` stopped it elsewhere.

        Warns once through ``notify`` when a component exits. Returns why it ended. Main thread only.
        """
        say = notify or (lambda _msg: None)
        stop = threading.Event()
        received: list[int] = []

        def on_signal(signum: int, _frame: object) -> None:
            received.append(signum)
            stop.set()

        previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        data_dir = Path(state.data_dir)
        warned: set[str] = set()
        try:
            while not stop.wait(poll):
                current = load_state(data_dir)
                if current is None or current.stack_id != state.stack_id or current.status == "stopping":
                    return "stopped elsewhere"
                for name, comp in current.components.items():
                    if name not in warned and not processes.same_process(comp.pid, comp.create_time):
                        warned.add(name)
                        say(f"{name} exited; its log: {comp.log}")
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
        # a second Ctrl-C while stopping must not leave half a stack behind
        with _signals_ignored():
            say("stopping the local stack")
            Stack.down(data_dir)
        return signal.Signals(received[0]).name if received else "stopped"


# --------------------------------------------------------------------------- starting


def _resolve(data_dir: Path | None) -> Path:
    return (data_dir or default_data_dir()).expanduser().resolve()


def _running_message(state: StackState) -> str:
    pids = ", ".join(f"{n} {c.pid}" for n, c in state.components.items())
    return (
        f"a local DuanFlow stack is already running from {state.data_dir} ({pids}); "
        f"see it with `duanflow dev status --data-dir {state.data_dir}`, "
        f"stop it with `duanflow dev down --data-dir {state.data_dir}`"
    )


@contextlib.contextmanager
def _startup_lock(data_dir: Path) -> Iterator[None]:
    """One ``up`` at a time per data dir (the lock fd is not inherited by the children)."""
    fd = os.open(data_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StackRunningError(
                f"another `duanflow dev up` is starting a stack from {data_dir}; "
                f"wait for it, or stop it with `duanflow dev down --data-dir {data_dir}`"
            ) from None
        yield
    finally:
        os.close(fd)


@contextlib.contextmanager
def _signals_ignored() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _record(state: StackState, lock: threading.Lock, comp: ComponentState) -> None:
    with lock:
        state.components[comp.name] = comp
        save_state(state)


def _start_servers(state: StackState, creds: StackCredentials, say: Progress) -> None:
    """NATS, Postgres and S3 in parallel; each is recorded in the state file as soon as it runs."""
    data_dir = Path(state.data_dir)
    logs = data_dir / "logs"
    marker = {processes.STACK_ID_ENV: state.stack_id}
    lock = threading.Lock()
    starters: dict[str, Callable[[], servers.Proc]] = {
        "nats": lambda: servers.start_nats(
            data_dir / "nats", creds.nats_credentials, log_path=logs / "nats.log", extra_env=marker
        ),
        "postgres": lambda: servers.start_postgres(
            data_dir / "postgres", log_path=logs / "postgres.log", extra_env=marker
        ),
        "s3": lambda: servers.start_s3(
            data_dir / "s3", creds.s3_credentials, bucket=state.s3_bucket, log_path=logs / "s3.log", extra_env=marker
        ),
    }
    errors: list[ComponentStartError] = []
    with concurrent.futures.ThreadPoolExecutor(max_workers=len(starters)) as pool:
        futures = {name: pool.submit(fn) for name, fn in starters.items()}
        for name, fut in futures.items():
            try:
                proc = fut.result()
            except servers.StartError as exc:
                errors.append(ComponentStartError(name, exc.log_path, str(exc)))
                continue
            except Exception as exc:
                log_path = logs / f"{name}.log"
                errors.append(ComponentStartError(name, log_path, str(servers.StartError(name, log_path, repr(exc)))))
                continue
            _record(
                state,
                lock,
                ComponentState(
                    name=name,
                    kind=KIND_SERVER,
                    pid=proc.pid,
                    create_time=processes.create_time(proc.pid),
                    address=proc.address,
                    log=str(proc.log_path),
                ),
            )
            say(f"{name} ready at {proc.address}")
    if errors:
        raise errors[0]
    state.nats_url = state.components["nats"].address
    state.postgres_dsn = state.components["postgres"].address
    state.s3_endpoint = state.components["s3"].address
    save_state(state)


def _service_env(name: str, state: StackState, creds: StackCredentials, extra: Mapping[str, str]) -> dict[str, str]:
    """The environment of one service: the settings in each service's ``settings.py`` (unknown names are ignored)."""
    # Services read only what is set here: no DUANFLOW_* of the caller's shell leaks in, except the few
    # agent settings a user may choose for the local agent (GPUs to offer, simulation, region, prices).
    env = {k: v for k, v in os.environ.items() if not k.startswith("DUANFLOW_") or k in USER_AGENT_SETTINGS}
    if name != "agent":
        env = {k: v for k, v in env.items() if k not in USER_AGENT_SETTINGS}
    role = "agent" if name == "agent" else "service"
    env.update(
        {
            "PYTHONUNBUFFERED": "1",
            processes.STACK_ID_ENV: state.stack_id,
            "DUANFLOW_NATS_URL": state.nats_url,
            "DUANFLOW_NATS_USER": role,
            "DUANFLOW_NATS_PASSWORD": creds.nats[role],
            "DUANFLOW_SECRET_KEY": creds.secret_key,
        }
    )
    prefix = f"DUANFLOW_{name.upper()}_"
    if name == "agent":  # replicas connect with the agent role (docs/CONTRACTS.md)
        env[prefix + "REPLICA_NATS_USER"] = "agent"
        env[prefix + "REPLICA_NATS_PASSWORD"] = creds.nats["agent"]
    if name == "builder":
        env[prefix + "WORK_DIR"] = str(Path(state.data_dir) / "builder")
    if name == "router":  # seals stored secrets (AES-GCM); generated once per data dir
        env[prefix + "SECRET_KEY"] = creds.secret_key
    if name != "agent":
        env.update(
            {
                prefix + "DATABASE_URL": state.postgres_dsn,
                prefix + "S3_ENDPOINT": state.s3_endpoint,
                prefix + "S3_ACCESS_KEY": creds.s3_access_key,
                prefix + "S3_SECRET_KEY": creds.s3_secret_key,
                prefix + "S3_BUCKET": state.s3_bucket,
            }
        )
    env.update(extra)
    return env


def _spawn(argv: Sequence[str], env: Mapping[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    out: IO[bytes] = log_path.open("ab")
    try:
        return subprocess.Popen(
            list(argv),
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=dict(env),
            cwd=log_path.parent.parent,
            start_new_session=True,
        )
    finally:
        out.close()


_CHILDREN: dict[int, subprocess.Popen[bytes]] = {}  # kept so a foreground owner can reap them


def _start_services(
    state: StackState,
    creds: StackCredentials,
    names: Sequence[str],
    commands: Mapping[str, Sequence[str]],
    timeout: float,
    say: Progress,
) -> None:
    """Spawn every service at once, then wait until each answers health (or one fails)."""
    data_dir = Path(state.data_dir)
    lock = threading.Lock()
    popens: dict[str, subprocess.Popen[bytes]] = {}
    for name in names:
        extra: dict[str, str] = {}
        address = subjects.health(name)
        details: dict[str, str] = {}
        if name == "gateway":
            port = servers.free_port()
            extra = {"DUANFLOW_GATEWAY_HTTP_HOST": servers.LOOPBACK, "DUANFLOW_GATEWAY_HTTP_PORT": str(port)}
            state.gateway_url = address = f"http://{servers.LOOPBACK}:{port}"
        elif name == "agent":
            work_dir = data_dir / "agent"
            work_dir.mkdir(parents=True, exist_ok=True)
            extra = {"DUANFLOW_AGENT_AGENT_ID": AGENT_ID, "DUANFLOW_AGENT_WORK_DIR": str(work_dir)}
            state.agent_id = AGENT_ID
            forced = os.environ.get("DUANFLOW_AGENT_SIMULATE", "").strip().lower()
            if forced in ("1", "true", "yes"):
                state.simulated = True
            elif not forced and not os.environ.get("DUANFLOW_AGENT_GPUS") and not gpu_visible():
                extra["DUANFLOW_AGENT_SIMULATE"] = "1"
                state.simulated = True
            address = f"agent {AGENT_ID}"
            details = {"agent_id": AGENT_ID, "simulated": "true" if state.simulated else "false"}
        log_path = data_dir / "logs" / f"{name}.log"
        argv = commands.get(name) or [sys.executable, "-m", f"duanflow_{name}"]
        popen = _spawn(argv, _service_env(name, state, creds, extra), log_path)
        _CHILDREN[popen.pid] = popen
        popens[name] = popen
        _record(
            state,
            lock,
            ComponentState(
                name=name,
                kind=KIND_SERVICE,
                pid=popen.pid,
                create_time=processes.create_time(popen.pid),
                address=address,
                log=str(log_path),
                details=details,
            ),
        )
    if popens:
        run_sync(lambda: _wait_services(state, creds, popens, timeout, say))


async def _wait_services(
    state: StackState,
    creds: StackCredentials,
    popens: Mapping[str, subprocess.Popen[bytes]],
    within_s: float,
    say: Progress,
) -> None:
    probe = await NatsProbe.connect(state.nats_url, "client", creds.nats["client"])
    try:

        async def healthy(name: str, popen: subprocess.Popen[bytes]) -> HealthReply:
            reply = await wait_healthy(probe, name, exited=popen.poll, within_s=within_s)
            if name == "gateway":  # the gateway also has to answer HTTP
                await wait_http(f"{state.gateway_url}{GATEWAY_HEALTH_PATH}", exited=popen.poll, within_s=within_s)
            return reply

        tasks = {asyncio.create_task(healthy(name, popen), name=name): name for name, popen in popens.items()}
        pending: set[asyncio.Task[HealthReply]] = set(tasks)
        try:
            while pending:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    name = tasks[task]
                    exc = task.exception()
                    if exc is not None:
                        log_path = Path(state.components[name].log)
                        reason = str(exc) if isinstance(exc, ServiceDown) else repr(exc)
                        raise ComponentStartError(name, log_path, str(servers.StartError(name, log_path, reason)))
                    say(f"{name} healthy ({state.components[name].address})")
        finally:
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending)
        if "router" in popens and "agent" in popens:
            await _wait_router_sees_agent(probe, state, popens["router"], within_s)
            say("router sees the agent's capacity")
    finally:
        await probe.close()


async def _wait_router_sees_agent(
    probe: NatsProbe, state: StackState, router: subprocess.Popen[bytes], within_s: float
) -> None:
    """Wait for the agent's first capacity report to reach the router, so a deploy right after ``up`` places.

    Only when the router's health says how many agents it sees (``live_agents``).
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within_s
    while True:
        if router.poll() is not None:
            log_path = Path(state.components["router"].log)
            raise ComponentStartError(
                "router", log_path, str(servers.StartError("router", log_path, f"exited with code {router.returncode}"))
            )
        with contextlib.suppress(Exception):
            live = (await probe.health("router", reply_timeout=1.0)).details.get("live_agents")
            if live is None or live.strip() not in ("", "0"):
                return
        if loop.time() >= deadline:
            log_path = Path(state.components["agent"].log)
            reason = f"the router saw no capacity report from agent {state.agent_id} within {within_s:.0f}s"
            raise ComponentStartError("agent", log_path, str(servers.StartError("agent", log_path, reason)))
        await asyncio.sleep(0.1)


# --------------------------------------------------------------------------- stopping


def _teardown(state: StackState, *, grace: float) -> None:
    """Stop services first (their replicas with them), then S3 (SIGINT), Postgres (SIGINT: fast shutdown), NATS."""
    comps = state.components
    services = [c for c in comps.values() if c.kind == KIND_SERVICE]
    _stop(services, signal.SIGTERM, grace)
    server_pids: set[int] = set()
    for comp in comps.values():
        if comp.kind == KIND_SERVER and processes.same_process(comp.pid, comp.create_time):
            server_pids |= processes.family(comp.pid)
    # replicas outlive a crashed agent: they carry no marker (agents pass no DUANFLOW_* on) but work in the data dir
    stray = processes.marked(state.stack_id) | processes.working_in(Path(state.data_dir))
    orphans = stray - server_pids - processes.ancestry(os.getpid())
    if orphans:
        processes.terminate(orphans, sig=signal.SIGTERM, grace=3.0)
    for name, sig, wait in (
        ("s3", signal.SIGINT, 4.0),
        ("postgres", signal.SIGINT, 10.0),
        ("nats", signal.SIGTERM, 5.0),
    ):
        if name in comps:
            _stop([comps[name]], sig, wait)
    leftovers = processes.marked(state.stack_id)
    if leftovers:
        processes.terminate(leftovers, sig=signal.SIGKILL, grace=2.0)
    for pid in [p for p in _CHILDREN if not processes.is_running(p)]:
        _CHILDREN.pop(pid).poll()


def _stop(comps: Sequence[ComponentState], sig: int, grace: float) -> None:
    pids: set[int] = set()
    sessions: list[int] = []
    for comp in comps:
        if processes.same_process(comp.pid, comp.create_time):
            pids |= processes.family(comp.pid)
            sessions.append(comp.pid)
        else:
            pids |= processes.session_members(comp.pid)  # children left behind by a leader that died
    if pids:
        processes.terminate(pids, sig=sig, grace=grace, sessions=sessions)

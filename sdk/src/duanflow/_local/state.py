"""What a local stack keeps on disk: its credentials (generated once) and its state file (while it runs).

``<data-dir>/credentials.json`` (mode 0600) holds the per-role NATS passwords, the S3 keys and a secret
key; it is written on the first ``duanflow dev up`` and reused afterwards, so the JetStream store, the
Postgres data and the S3 objects of a data dir stay usable across restarts.

``<data-dir>/stack.json`` names every process of a running stack (pid, process start time, address,
log). It is written as each component starts, so ``duanflow dev down`` can stop a stack whose ``up``
crashed half way, and removed by ``down``.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

import msgspec

from duanflow._local.servers import NatsCredentials, S3Credentials

CREDENTIALS_FILE = "credentials.json"
STATE_FILE = "stack.json"

KIND_SERVER = "server"
KIND_SERVICE = "service"


class StackCredentials(msgspec.Struct, kw_only=True):
    """Secrets of one local stack, generated once per data dir."""

    nats: dict[str, str]
    """NATS role (client, agent, service) → password."""
    s3_access_key: str
    """Access key of the local S3 server."""
    s3_secret_key: str
    """Secret key of the local S3 server."""
    secret_key: str
    """Secret the services may sign tokens with (``DUANFLOW_SECRET_KEY``)."""

    @classmethod
    def generate(cls) -> StackCredentials:
        """Fresh random credentials."""
        s3 = S3Credentials.generate()
        return cls(
            nats=NatsCredentials.generate().as_dict(),
            s3_access_key=s3.access_key,
            s3_secret_key=s3.secret_key,
            secret_key=secrets.token_urlsafe(32),
        )

    @property
    def nats_credentials(self) -> NatsCredentials:
        """The NATS passwords as :class:`NatsCredentials`."""
        return NatsCredentials(client=self.nats["client"], agent=self.nats["agent"], service=self.nats["service"])

    @property
    def s3_credentials(self) -> S3Credentials:
        """The S3 keys as :class:`S3Credentials`."""
        return S3Credentials(access_key=self.s3_access_key, secret_key=self.s3_secret_key)


def load_or_create_credentials(data_dir: Path) -> StackCredentials:
    """The data dir's credentials, generated and written (mode 0600) on first use."""
    path = data_dir / CREDENTIALS_FILE
    if path.exists():
        creds = msgspec.json.decode(path.read_bytes(), type=StackCredentials)
        path.chmod(0o600)
        return creds
    creds = StackCredentials.generate()
    write_private(path, msgspec.json.format(msgspec.json.encode(creds)))
    return creds


def write_private(path: Path, data: bytes) -> None:
    """Write ``data`` atomically to ``path`` with mode 0600 (never readable by others, not even briefly)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    tmp.chmod(0o600)
    tmp.replace(path)


class ComponentState(msgspec.Struct, kw_only=True):
    """One process of the stack."""

    name: str
    """Component name (``nats``, ``postgres``, ``s3``, ``router``, ..., ``agent``)."""
    kind: str
    """``server`` or ``service``."""
    pid: int
    """Process id; the process leads its own session, so its session id is the same number."""
    create_time: float
    """Process start time (guards against a recycled pid)."""
    address: str
    """Where it listens (URL, DSN, ``host:port``) or what it answers on."""
    log: str
    """Path of its log file."""
    details: dict[str, str] = {}
    """Extra facts (agent id, simulated inventory, ...)."""


class StackState(msgspec.Struct, kw_only=True):
    """A (starting or running) local stack, as written to ``<data-dir>/stack.json``."""

    data_dir: str
    """The stack's data dir."""
    stack_id: str
    """Marks every process of this stack (``DUANFLOW_STACK_ID`` in their environment)."""
    status: str = "starting"
    """``starting`` while ``up`` runs, then ``running``."""
    started_at: float = 0.0
    """Unix time ``up`` began."""
    owner_pid: int = 0
    """Pid of a foreground ``duanflow dev up`` that stops the stack on Ctrl-C (0 when detached)."""
    nats_url: str = ""
    """NATS URL."""
    postgres_dsn: str = ""
    """Postgres DSN."""
    s3_endpoint: str = ""
    """S3 endpoint ``host:port``."""
    s3_bucket: str = "duanflow"
    """The stack's bucket."""
    gateway_url: str = ""
    """HTTP gateway base URL."""
    agent_id: str = ""
    """Id of the local agent."""
    simulated: bool = False
    """Whether the agent offers a simulated GPU inventory."""
    components: dict[str, ComponentState] = {}
    """Name → process, in start order."""

    @property
    def path(self) -> Path:
        """Path of the state file."""
        return Path(self.data_dir) / STATE_FILE


def save_state(state: StackState) -> None:
    """Write the state file (mode 0600: it names the data dir's layout, not secrets, but stays private)."""
    write_private(state.path, msgspec.json.format(msgspec.json.encode(state)))


def load_state(data_dir: Path) -> StackState | None:
    """The state file of ``data_dir``, or None when there is none (or it is unreadable)."""
    path = data_dir / STATE_FILE
    try:
        return msgspec.json.decode(path.read_bytes(), type=StackState)
    except (OSError, msgspec.DecodeError, msgspec.ValidationError):
        return None


def remove_state(data_dir: Path) -> None:
    """Delete the state file (no error when absent)."""
    (data_dir / STATE_FILE).unlink(missing_ok=True)

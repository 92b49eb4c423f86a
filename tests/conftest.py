"""Real infrastructure for integration and e2e tests: NATS (JetStream, per-role users), Postgres and S3,
started once per session on free loopback ports in temp dirs. Each test gets unique names."""

from __future__ import annotations

import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from duanflow._local import servers


@dataclass
class Infra:
    """Addresses and credentials of the session's servers."""

    nats_url: str
    nats: servers.NatsCredentials
    postgres_dsn: str
    s3_endpoint: str
    s3: servers.S3Credentials
    bucket: str
    root: Path


@pytest.fixture(scope="session")
def infra_root() -> Iterator[Path]:
    root = Path(tempfile.mkdtemp(prefix="duanflow-test-"))
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def nats_server(infra_root: Path) -> Iterator[tuple[servers.Proc, servers.NatsCredentials]]:
    creds = servers.NatsCredentials.generate()
    proc = servers.start_nats(infra_root / "nats", creds)
    yield proc, creds
    proc.stop()


@pytest.fixture(scope="session")
def postgres_server(infra_root: Path) -> Iterator[servers.Proc]:
    proc = servers.start_postgres(infra_root / "pg")
    yield proc
    proc.stop()


@pytest.fixture(scope="session")
def s3_server(infra_root: Path) -> Iterator[tuple[servers.Proc, servers.S3Credentials]]:
    creds = servers.S3Credentials.generate()
    proc = servers.start_s3(infra_root / "s3", creds, bucket="duanflow")
    yield proc, creds
    servers.stop_s3(proc)


@pytest.fixture(scope="session")
def infra(
    infra_root: Path,
    nats_server: tuple[servers.Proc, servers.NatsCredentials],
    postgres_server: servers.Proc,
    s3_server: tuple[servers.Proc, servers.S3Credentials],
) -> Infra:
    return Infra(
        nats_url=nats_server[0].address,
        nats=nats_server[1],
        postgres_dsn=postgres_server.address,
        s3_endpoint=s3_server[0].address,
        s3=s3_server[1],
        bucket="duanflow",
        root=infra_root,
    )


@pytest.fixture
def unique() -> str:
    """A unique lowercase token for names (apps, schemas, subjects)."""
    return "t" + uuid.uuid4().hex[:10]


@pytest.fixture
async def nc_service(nats_server: tuple[servers.Proc, servers.NatsCredentials]) -> AsyncIterator[object]:
    """A nats-py connection with the service role."""
    import nats

    nc = await nats.connect(nats_server[0].address, user="service", password=nats_server[1].service)
    yield nc
    await nc.close()

"""The builder against real NATS, Postgres and S3: cache hits, refusals, and a real (small) pip build."""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import shutil
import signal
import socket
import sys
import tarfile
from collections.abc import AsyncIterator
from typing import Any

import pytest
from duanflow_builder.app import build_app
from duanflow_builder.settings import Settings
from duanflow_kit.handlers import decode_reply
from duanflow_proto import codec, subjects
from duanflow_proto.errors import InvalidInputError
from duanflow_proto.messages.build import BuildRequest, BuildResult, ImageSpec
from duanflow_proto.messages.common import Ack, ErrorReply, HealthReply, HealthRequest
from duanflow_proto.messages.logs import LogLine
from fixtures.waiting import eventually
from minio import Minio

pytestmark = pytest.mark.timeout(90)


def settings_for(infra: Any, unique: str) -> Settings:
    return Settings(
        nats_url=infra.nats_url,
        nats_user="service",
        nats_password=infra.nats.service,
        database_url=infra.postgres_dsn,
        s3_endpoint=infra.s3_endpoint,
        s3_access_key=infra.s3.access_key,
        s3_secret_key=infra.s3.secret_key,
        s3_bucket=infra.bucket,
        schema=f"builder_{unique}",
        work_dir=str(infra.root / "builds" / unique),
    )


async def health(nc: Any) -> HealthReply:
    msg = await nc.request(subjects.health("builder"), codec.encode(HealthRequest()), timeout=2)
    reply: HealthReply = decode_reply(msg.data, HealthReply)
    return reply


@pytest.fixture
async def builder(infra: Any, unique: str, nc_service: Any) -> AsyncIterator[Settings]:
    settings = settings_for(infra, unique)
    app = build_app(settings)
    task = asyncio.create_task(app.run())
    try:
        await eventually(lambda: _healthy(nc_service), timeout=30)
        yield settings
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        # the service stops its broker when cancelled; this closes it even if that stop was cut short
        await app.service.broker.stop()


async def _healthy(nc: Any) -> bool:
    h = await health(nc)
    return h.ok and h.details.get("db") == "ok"


async def request(nc: Any, req: BuildRequest, timeout: float = 10) -> BuildResult:
    msg = await nc.request(subjects.BUILD_START, codec.encode(req), timeout=timeout)
    result: BuildResult = decode_reply(msg.data, BuildResult)
    return result


async def test_second_request_is_cached(builder: Settings, nc_service: Any, unique: str) -> None:
    spec = ImageSpec(env={"MARK": unique}, python="3.11")
    first = await request(nc_service, BuildRequest(spec=spec, app=unique))
    assert first.status == "built" and first.image_id.startswith("im-") and first.artifact == ""
    second = await request(nc_service, BuildRequest(spec=ImageSpec(env={"MARK": unique}, python="3.11"), app=unique))
    assert second.status == "cached" and second.image_id == first.image_id
    h = await health(nc_service)
    assert h.details["images"] == "1"


async def test_apt_under_venv_is_refused(builder: Settings, nc_service: Any, unique: str) -> None:
    with pytest.raises(InvalidInputError, match="docker runtime") as exc:
        await request(nc_service, BuildRequest(spec=ImageSpec(apt=["ffmpeg"]), app=unique))
    assert exc.value.code == "invalid_input" and "apt_install" in exc.value.message


async def test_base_image_is_instant_and_logs_to_the_build_subject(
    builder: Settings, nc_service: Any, unique: str
) -> None:
    """No pip packages: nothing to install, the agent's own environment is the image; the log says so."""
    from duanflow_builder.domain import image_id

    spec = ImageSpec(env={"MARK": unique})
    image = image_id(spec)
    got: list[LogLine] = []

    async def collect(msg: Any) -> None:
        got.append(codec.decode(msg.data, LogLine))

    sub = await nc_service.subscribe(subjects.logs("prod", unique, "build", image), cb=collect)
    try:
        result = await request(nc_service, BuildRequest(spec=spec, app=unique, env="prod"), timeout=5)
        assert (result.image_id, result.status, result.artifact) == (image, "built", "")
        assert result.duration_ms < 2000
        await eventually(lambda: _true(any("needs no build" in line.message for line in got)))
    finally:
        await sub.unsubscribe()
    assert all((line.env, line.app, line.kind, line.source) == ("prod", unique, "build", image) for line in got)


async def _true(value: bool) -> bool:
    return value


@pytest.mark.parametrize("subject", [subjects.BUILD_START, subjects.health("builder")])
@pytest.mark.parametrize(
    "payload", [b"\x00garbage\xff", b"", codec.encode(Ack())], ids=["bytes", "empty", "wrong-type"]
)
async def test_garbage_gets_invalid_input_and_the_builder_keeps_serving(
    builder: Settings, nc_service: Any, unique: str, subject: str, payload: bytes
) -> None:
    msg = await nc_service.request(subject, payload, timeout=5)
    err = codec.decode(msg.data, ErrorReply)
    assert err.code == "invalid_input" and err.http_status == 400
    assert await _healthy(nc_service)
    result = await request(nc_service, BuildRequest(spec=ImageSpec(env={"MARK": unique}), app=unique))
    assert result.status == "built"


async def test_sigterm_exits_cleanly(infra: Any, unique: str, nc_service: Any) -> None:
    env = {
        **os.environ,
        "DUANFLOW_NATS_URL": infra.nats_url,
        "DUANFLOW_NATS_USER": "service",
        "DUANFLOW_NATS_PASSWORD": infra.nats.service,
        "DUANFLOW_BUILDER_DATABASE_URL": infra.postgres_dsn,
        "DUANFLOW_BUILDER_S3_ENDPOINT": infra.s3_endpoint,
        "DUANFLOW_BUILDER_S3_ACCESS_KEY": infra.s3.access_key,
        "DUANFLOW_BUILDER_S3_SECRET_KEY": infra.s3.secret_key,
        "DUANFLOW_BUILDER_S3_BUCKET": infra.bucket,
        "DUANFLOW_BUILDER_SCHEMA": f"builder_{unique}",
        "DUANFLOW_BUILDER_INSTANCE": f"builder-{unique}",
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "duanflow_builder",
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:

        async def this_one_answers() -> bool:
            h = await health(nc_service)
            return h.instance == f"builder-{unique}" and h.ok and h.details.get("db") == "ok"

        await eventually(this_one_answers, timeout=30)
        proc.send_signal(signal.SIGTERM)
        rc = await asyncio.wait_for(proc.wait(), timeout=10)
        out = (await proc.stdout.read()).decode() if proc.stdout else ""
        assert rc == 0, out
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


def _pypi_reachable() -> bool:
    try:
        with socket.create_connection(("pypi.org", 443), timeout=3):
            return True
    except OSError:
        return False


@pytest.mark.timeout(120)
async def test_real_pip_build_uploads_a_venv(builder: Settings, nc_service: Any, unique: str) -> None:
    """A tiny pure-Python package, built for real with uv; skipped when PyPI is out of reach."""
    if not _pypi_reachable():
        pytest.skip("PyPI is not reachable from this machine")
    got: list[LogLine] = []

    async def collect(msg: Any) -> None:
        got.append(codec.decode(msg.data, LogLine))

    async def on_done(msg: Any) -> None:
        if not done.done():
            done.set_result(codec.decode(msg.data, BuildResult))

    sub = await nc_service.subscribe(subjects.logs_filter("main", unique, "build"), cb=collect)
    done: asyncio.Future[BuildResult] = asyncio.get_running_loop().create_future()
    spec = ImageSpec(pip=["six==1.16.0"], env={"MARK": unique})
    res_img = None
    try:
        from duanflow_builder.domain import image_id

        res_img = image_id(spec)
        done_sub = await nc_service.subscribe(subjects.build_done(res_img), cb=on_done)
        try:
            result = await request(nc_service, BuildRequest(spec=spec, app=unique), timeout=60)
        except TimeoutError:
            pytest.skip("the pip build took over 60 s")
        assert result.status == "built", result.log_tail
        assert result.artifact == f"images/{result.image_id}.tar.gz"
        assert (await asyncio.wait_for(done, 5)).image_id == result.image_id
        await done_sub.unsubscribe()
    finally:
        await sub.unsubscribe()
    assert any("six" in line.message for line in got), [x.message for x in got]
    assert all(line.kind == "build" and line.source == res_img for line in got)

    client = Minio(
        builder.s3_endpoint, access_key=builder.s3_access_key, secret_key=builder.s3_secret_key, secure=False
    )
    obj = await asyncio.to_thread(client.get_object, builder.s3_bucket, result.artifact)
    data = obj.read()
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        names = tar.getnames()
    assert "pyvenv.cfg" in names
    assert any(n.endswith("site-packages/six.py") for n in names)
    again = await request(nc_service, BuildRequest(spec=spec, app=unique))
    assert again.status == "cached" and again.artifact == result.artifact
    # the bucket lost the artifact: the builder notices and builds it again instead of answering "cached"
    await asyncio.to_thread(client.remove_object, builder.s3_bucket, result.artifact)
    rebuilt = await request(nc_service, BuildRequest(spec=spec, app=unique), timeout=60)
    assert rebuilt.status == "built" and rebuilt.artifact == result.artifact
    await asyncio.to_thread(client.stat_object, builder.s3_bucket, result.artifact)
    shutil.rmtree(builder.work_dir, ignore_errors=True)

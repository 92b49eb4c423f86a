"""``f.remote()`` / ``.remote.aio()`` / ``.spawn()`` against real replicas (``python -m duanflow._runtime``) on a
real NATS server, without router or agent: the test creates the streams and the function's durable consumer as
the router would, and starts the replica with the environment an agent gives it (docs/CONTRACTS.md)."""

from __future__ import annotations

import asyncio
import importlib
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import duanflow as df
import nats
import pytest
from duanflow import _client, _lane
from duanflow._local import servers
from duanflow_kit.streams import ensure_streams
from duanflow_proto import codec, subjects
from duanflow_proto.messages.common import ErrorReply
from duanflow_proto.messages.invocation import HDR_REPLY, Result
from duanflow_proto.messages.release import FunctionLookup
from fixtures.replicas import new_replica_id, replica_env, spawn_ready
from fixtures.waiting import eventually, eventually_sync
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

pytestmark = pytest.mark.timeout(90)

APP_SOURCE = '''
import asyncio
import time

import duanflow as df
import hidden_errors

app = df.App("{app}")


class AppError(Exception):
    """Raised on purpose; importable by the caller."""


@app.function(gpu="H100", timeout=1.5)
def work(mode: str, value: object = None) -> object:
    if mode == "echo":
        return {{"value": value, "pid_is_remote": True}}
    if mode == "boom":
        raise AppError(f"boom: {{value}}")
    if mode == "hidden":
        raise hidden_errors.HiddenError("only the replica can import me")
    if mode == "big":
        return b"x" * int(value)  # type: ignore[call-overload]
    if mode == "sleep":
        time.sleep(float(value))  # type: ignore[arg-type]
        return "slept"
    raise ValueError(mode)


ATTEMPTS: dict[str, int] = {{}}


@app.function(retries=df.Retries(max_retries=2, initial_delay=0.1), timeout=5)
def flaky(key: str, fail_times: int) -> int:
    ATTEMPTS[key] = ATTEMPTS.get(key, 0) + 1
    if ATTEMPTS[key] <= fail_times:
        raise AppError(f"attempt {{ATTEMPTS[key]}} failed")
    return ATTEMPTS[key]


@app.function(concurrency=4, timeout=10)
async def awork(seconds: float, tag: str) -> str:
    await asyncio.sleep(seconds)
    return tag
'''

HIDDEN_SOURCE = '''
class HiddenError(Exception):
    """Only importable on the replica's PYTHONPATH."""
'''


@dataclass
class Deployed:
    env: str
    app_name: str
    module: ModuleType
    nats_url: str
    creds: servers.NatsCredentials
    app_dir: Path
    hidden_dir: Path
    logs: Path
    replicas: dict[str, subprocess.Popen[bytes]]


def consumer_config(env: str, app: str, spec: Any) -> ConsumerConfig:
    """The function's durable consumer, as the router creates it (docs/CONTRACTS.md)."""
    return ConsumerConfig(
        durable_name=subjects.consumer_name(env, app, spec.name),
        deliver_policy=DeliverPolicy.ALL,
        ack_policy=AckPolicy.EXPLICIT,
        ack_wait=spec.timeout_s + 30,
        max_deliver=spec.retries + 5,
        filter_subject=subjects.invocation(env, app, spec.name),
        max_ack_pending=100_000,
    )


async def start_replica(d: Deployed, function: str, **extra: str) -> subprocess.Popen[bytes]:
    """Start one replica and wait for its ready Ack, as an agent does."""
    replica_id = new_replica_id()
    env = replica_env(
        nats_url=d.nats_url,
        agent_password=d.creds.agent,
        spec=d.module.app._registry()[function].spec,
        env=d.env,
        app=d.app_name,
        module=d.module.__name__,
        app_dir=d.app_dir,
        replica_id=replica_id,
        simulated_gpu=True,
        extra_paths=(d.hidden_dir,),
        **extra,
    )
    return await spawn_ready(
        nats_url=d.nats_url,
        agent_password=d.creds.agent,
        replica_id=replica_id,
        env=env,
        cwd=d.app_dir,
        log_path=d.logs / f"{function}-{replica_id}.log",
    )


async def _setup(d: Deployed) -> None:
    nc = await nats.connect(d.nats_url, user="service", password=d.creds.service)
    try:
        js = nc.jetstream()
        await ensure_streams(js)
        for fn in d.module.app._registry().values():
            await js.add_consumer(subjects.STREAM_INVOCATIONS, consumer_config(d.env, d.app_name, fn.spec))
        for function in ("work", "awork", "flaky"):
            d.replicas[function] = await start_replica(d, function)
    finally:
        await nc.close()


@pytest.fixture(scope="module")
def deployed(
    nats_server: tuple[servers.Proc, servers.NatsCredentials], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Deployed]:
    token = uuid.uuid4().hex[:8]
    root = tmp_path_factory.mktemp("remote")
    app_dir, hidden_dir, logs = root / "app", root / "hidden", root / "logs"
    for p in (app_dir, hidden_dir, logs):
        p.mkdir()
    module_name = f"remote_app_{token}"
    app_name = f"rt-{token}"
    (app_dir / f"{module_name}.py").write_text(textwrap.dedent(APP_SOURCE.format(app=app_name)))
    (hidden_dir / "hidden_errors.py").write_text(HIDDEN_SOURCE)
    with pytest.MonkeyPatch.context() as mp:
        # The caller: a user script with its app file importable, connected as the client role.
        mp.syspath_prepend(str(app_dir))
        mp.setenv("DUANFLOW_NATS_URL", nats_server[0].address)
        mp.setenv("DUANFLOW_NATS_USER", "client")
        mp.setenv("DUANFLOW_NATS_PASSWORD", nats_server[1].client)
        mp.setenv("DUANFLOW_ENV", f"e{token}")
        mp.setenv("DUANFLOW_HOME", str(root / "home"))
        # The caller cannot import hidden_errors: put a stand-in module away while importing the app here.
        sys.modules["hidden_errors"] = ModuleType("hidden_errors")
        try:
            module = importlib.import_module(module_name)
        finally:
            del sys.modules["hidden_errors"]
        _client.reset_client()
        d = Deployed(
            env=f"e{token}",
            app_name=app_name,
            module=module,
            nats_url=nats_server[0].address,
            creds=nats_server[1],
            app_dir=app_dir,
            hidden_dir=hidden_dir,
            logs=logs,
            replicas={},
        )
        try:
            asyncio.run(_setup(d))
            yield d
        finally:
            _client.reset_client()
            for proc in d.replicas.values():
                if proc.poll() is None:
                    proc.kill()
                    proc.wait(10)


def test_remote_runs_on_the_replica(deployed: Deployed, capfd: pytest.CaptureFixture[str]) -> None:
    _client._simulated_noted.discard("work")
    assert deployed.module.work.remote("echo", "我的模型接口超时了") == {
        "value": "我的模型接口超时了",
        "pid_is_remote": True,
    }
    assert deployed.module.work.remote("echo", value=[1, 2]) == {"value": [1, 2], "pid_is_remote": True}
    err = capfd.readouterr().err
    assert err.count("note: work ran on a simulated H100 (no GPU on this machine)") == 1, err


async def _held(client: _client.Client) -> tuple[int, int]:
    return len(client._pending), len(client._in_flight)


def test_answered_calls_leave_nothing_behind_and_are_never_published_again(deployed: Deployed) -> None:
    """A sync or cross-loop call that got its answer is forgotten at once: no waiter kept per call (memory), and no
    late confirmation publishing the invocation again a second later (a PubAck and a de-duplication per call)."""
    work = deployed.module.work
    client = _client.get_client()
    assert work.remote("echo", 0) == {"value": 0, "pid_is_remote": True}
    for i in range(50):
        assert work.remote("echo", i)["value"] == i

    async def aio_calls() -> list[Any]:
        return [await work.remote.aio("echo", i) for i in range(20)]

    assert [r["value"] for r in asyncio.run(aio_calls())] == list(range(20))
    assert client.run(_held, client) == (0, 0)
    unacked_before = len(client._unacked)
    time.sleep(_lane.CONFIRM_AFTER_S + 0.3)  # past the late confirmation of every call above
    assert client.run(_held, client) == (0, 0)
    assert len(client._unacked) == unacked_before  # nothing was published again asking for a PubAck


def test_sync_calls_drive_the_lane_and_threads_share_it_safely(deployed: Deployed) -> None:
    """A sync call runs on the lane (a connection the calling thread drives itself); a thread that finds the lane
    busy takes the ordinary path; every call gets its own answer and nothing is left waiting."""
    work = deployed.module.work
    client = _client.get_client()
    assert work.remote("echo", -1)["value"] == -1
    assert work.remote("echo", -2)["value"] == -2
    lane = client._lane
    assert lane is not None and lane._nc is not None and lane._nc is not client._nc
    sent_before = lane._nc.stats["out_msgs"]
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda i: work.remote("echo", i)["value"], range(200)))
    assert got == list(range(200))
    assert lane._nc.stats["out_msgs"] > sent_before, "some of the calls went through the lane"
    assert lane._waiting == {}
    assert client.run(_held, client) == (0, 0)


def test_a_sync_call_rides_out_its_connection_dropping_mid_call(deployed: Deployed) -> None:
    """The lane's connection breaks while the replica runs the call: nats-py reconnects and the lane publishes
    the call again, so the caller still gets its answer."""
    work = deployed.module.work
    assert work.remote("echo", 0)["value"] == 0
    assert work.remote("echo", 1)["value"] == 1
    lane = _client.get_client()._lane
    assert lane is not None and lane._loop is not None
    loop, generation = lane._loop, lane._generation

    def drop() -> None:
        time.sleep(0.3)  # the call is running on the replica by now
        loop.call_soon_threadsafe(lambda: lane._nc._transport._io_writer.transport.abort())

    dropper = threading.Thread(target=drop)
    dropper.start()
    try:
        assert work.remote("sleep", 0.8) == "slept"
    finally:
        dropper.join()
    assert lane._generation > generation, "the connection was dropped and came back"
    assert work.remote("echo", 2)["value"] == 2


def test_an_idle_lane_with_a_dead_connection_recovers_before_it_publishes(
    deployed: Deployed, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_lane, "IDLE_CHECK_S", 0.0)
    work = deployed.module.work
    assert work.remote("echo", 0)["value"] == 0
    assert work.remote("echo", 1)["value"] == 1
    lane = _client.get_client()._lane
    assert lane is not None and lane._nc is not None
    lane._nc._transport._io_writer.transport.abort()  # the loop is not running: it finds out at the next call
    assert work.remote("echo", 2)["value"] == 2
    assert work.remote("echo", 3)["value"] == 3


async def test_remote_aio_runs_concurrently_up_to_concurrency(deployed: Deployed) -> None:
    awork = deployed.module.awork
    assert await awork.remote.aio(0, "warm") == "warm"
    started = time.monotonic()
    tags = await asyncio.gather(*(awork.remote.aio(0.6, f"t{i}") for i in range(4)))
    assert tags == ["t0", "t1", "t2", "t3"]
    assert time.monotonic() - started < 1.7, "4 inputs of 0.6 s with concurrency=4 should overlap"


async def test_blocking_remote_inside_an_event_loop_points_at_aio(deployed: Deployed) -> None:
    with pytest.raises(df.InvalidInputError, match=r"await work\.remote\.aio"):
        deployed.module.work.remote("echo", 1)


def test_spawn_then_get_here_and_from_another_handle(deployed: Deployed) -> None:
    call = deployed.module.work.spawn("echo", 7)
    assert call.object_id.startswith("fc-")
    assert call.get(timeout=30) == {"value": 7, "pid_is_remote": True}
    # Another handle on the same call (as another process would have) reads the results bucket.
    assert df.FunctionCall.from_id(call.object_id).get(timeout=30) == {"value": 7, "pid_is_remote": True}


def test_a_spawned_result_nobody_fetches_is_forgotten_and_get_still_finds_it(
    deployed: Deployed, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_client, "SPAWNED_KEEP_S", 0.2)
    client = _client.get_client()
    call = deployed.module.work.spawn("echo", 8)

    async def held() -> bool:
        return call.object_id in client._pending

    assert client.run(held)
    eventually_sync(lambda: not client.run(held), timeout=10)
    assert call.get(timeout=30) == {"value": 8, "pid_is_remote": True}


def test_user_exception_is_reraised_as_its_own_type_with_the_remote_traceback(deployed: Deployed) -> None:
    with pytest.raises(deployed.module.AppError, match="boom: 42") as info:
        deployed.module.work.remote("boom", 42)
    notes = "\n".join(getattr(info.value, "__notes__", []))
    assert "Remote traceback" in notes
    assert 'raise AppError(f"boom: {value}")' in notes


def test_unimportable_exception_becomes_remote_error(deployed: Deployed) -> None:
    with pytest.raises(df.RemoteError, match=r"hidden_errors\.HiddenError") as info:
        deployed.module.work.remote("hidden")
    assert info.value.remote_traceback and "only the replica can import me" in info.value.remote_traceback


def test_timeout_is_enforced_and_the_replica_keeps_serving(deployed: Deployed) -> None:
    started = time.monotonic()
    with pytest.raises(df.FunctionTimeoutError, match=r"timeout of 1\.5s"):
        deployed.module.work.remote("sleep", 5)
    assert time.monotonic() - started < 4
    assert deployed.module.work.remote("sleep", 0) == "slept"


def test_retries_rerun_failed_inputs_and_the_caller_sees_the_last_attempt(deployed: Deployed) -> None:
    assert deployed.module.flaky.remote("a", 2) == 3
    with pytest.raises(deployed.module.AppError, match="attempt 3 failed"):
        deployed.module.flaky.remote("b", 5)


def test_map_inputs_are_retried_with_the_policy_and_report_their_last_error(deployed: Deployed) -> None:
    out = list(deployed.module.flaky.starmap([("map-a", 1), ("map-b", 5)], return_exceptions=True))
    assert out[0] == 2
    assert isinstance(out[1], deployed.module.AppError) and str(out[1]) == "attempt 3 failed"


def test_large_payloads_without_a_router_say_what_they_need(deployed: Deployed) -> None:
    # Over ~1 MiB, arguments and results travel through S3 with URLs from the router; here there is none.
    with pytest.raises(df.UnavailableError, match="large payloads need the router"):
        deployed.module.work.remote("echo", b"x" * (3 * 2**20))
    with pytest.raises(df.UnavailableError, match="large payloads need the router"):
        deployed.module.work.remote("big", 9 * 2**20)
    assert deployed.module.work.remote("big", 10) == b"x" * 10


def test_function_from_name(deployed: Deployed) -> None:
    f = df.Function.from_name(deployed.app_name, "work", env=deployed.env)
    assert f.remote("echo", "x") == {"value": "x", "pid_is_remote": True}


async def test_malformed_invocation_gets_an_error_and_the_replica_keeps_serving(deployed: Deployed) -> None:
    nc = await nats.connect(deployed.nats_url, user="client", password=deployed.creds.client)
    try:
        inbox = nc.new_inbox()
        sub = await nc.subscribe(inbox)
        await nc.jetstream().publish(
            subjects.invocation(deployed.env, deployed.app_name, "work"), b"\x00garbage", headers={HDR_REPLY: inbox}
        )
        msg = await sub.next_msg(timeout=10)
        result = codec.decode(msg.data, Result)
        assert not result.ok and result.error is not None and result.error.code == "invalid_input"
    finally:
        await nc.close()
    assert await deployed.module.work.remote.aio("echo", 1) == {"value": 1, "pid_is_remote": True}


async def test_undeployed_function_says_to_deploy(deployed: Deployed) -> None:
    # A router that knows nothing of the function answers the lookup with not_found.
    nc = await nats.connect(deployed.nats_url, user="service", password=deployed.creds.service)
    try:

        async def lookup(msg: Any) -> None:
            req = codec.decode(msg.data, FunctionLookup)
            await msg.respond(codec.encode(ErrorReply(code="not_found", message=f"no function {req.function}")))

        await nc.subscribe(subjects.API_FUNCTION_LOOKUP, cb=lookup)
        await nc.flush()
        f = df.Function.from_name(deployed.app_name, "missing_fn", env=deployed.env)
        with pytest.raises(df.NotFoundError, match="duanflow deploy"):
            await f.remote.aio()
    finally:
        await nc.close()


async def test_sigterm_finishes_inputs_in_flight_then_exits_zero(deployed: Deployed) -> None:
    proc = await start_replica(deployed, "awork")
    deployed.replicas["awork-2"] = proc
    # Stop the module's own awork replica from taking the input, so the new one surely holds it.
    first = deployed.replicas["awork"]
    first.send_signal(signal.SIGTERM)
    await eventually(lambda: _exited(first), timeout=20)
    assert first.returncode == 0
    call = await deployed.module.awork.spawn.aio(1.5, "drained")
    nc = await nats.connect(deployed.nats_url, user="service", password=deployed.creds.service)
    try:
        js = nc.jetstream()
        consumer = subjects.consumer_name(deployed.env, deployed.app_name, "awork")

        async def in_flight() -> bool:
            info = await js.consumer_info(subjects.STREAM_INVOCATIONS, consumer)
            return bool(info.num_ack_pending == 1)

        await eventually(in_flight, timeout=10)
    finally:
        await nc.close()
    proc.send_signal(signal.SIGTERM)
    assert await call.get.aio(timeout=20) == "drained"
    await eventually(lambda: _exited(proc), timeout=20)
    assert proc.returncode == 0


async def _exited(proc: subprocess.Popen[bytes]) -> bool:
    return proc.poll() is not None

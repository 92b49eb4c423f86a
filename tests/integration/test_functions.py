"""The invocation surface beyond ``.remote()``: ``.map()`` / ``.starmap()``, lifecycle classes, generators, long
inputs keeping their lease, and durability when a replica is killed mid-map — against real replicas
(``python -m duanflow._runtime``) on a real NATS server, the consumers created as the router creates them."""

from __future__ import annotations

import asyncio
import importlib
import signal
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import duanflow as df
import nats
import pytest
from duanflow import _client
from duanflow._local import servers
from duanflow_kit.streams import ensure_streams
from duanflow_proto import codec, subjects
from duanflow_proto.messages.invocation import HDR_REPLY, Invocation, Result
from fixtures.replicas import new_replica_id, replica_env, spawn_ready
from fixtures.waiting import eventually
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

pytestmark = pytest.mark.timeout(120)

APP_SOURCE = '''
import asyncio
import os
import time
from pathlib import Path

import duanflow as df

app = df.App("{app}")
MARKS = Path(os.environ.get("FN_TEST_MARKS", "."))
LOADED_AT = time.time_ns()
if os.environ.get("DUANFLOW_REPLICA_ID"):
    with (MARKS / "loads").open("a") as f:
        f.write(os.environ["DUANFLOW_REPLICA_ID"] + "\\n")


class Odd(Exception):
    """Raised for odd inputs of fails_on_odd."""


@app.function(timeout=10)
def square(x: int) -> int:
    return x * x


@app.function(timeout=10)
def add(a: int, b: int, *, scale: int = 1) -> int:
    return (a + b) * scale


@app.function(timeout=10)
def fails_on_odd(x: int) -> int:
    if x % 2:
        raise Odd(f"odd: {{x}}")
    return x


@app.function(timeout=10)
async def asquare(x: int) -> int:
    await asyncio.sleep(0)
    return x * x


@app.function(timeout=10)
def countdown(n: int, fail_at: int = -1):
    for i in range(n, 0, -1):
        if i == fail_at:
            raise ValueError(f"failed at {{i}}")
        yield i


@app.function(timeout=10)
async def acountdown(n: int):
    for i in range(n, 0, -1):
        await asyncio.sleep(0)
        yield i


@app.function(timeout=30)
def slow_square(x: int) -> tuple[int, str]:
    time.sleep(0.004)
    return x * x, os.environ["DUANFLOW_REPLICA_ID"]


@app.function(timeout=10, concurrency=4)
def handoff(x: int) -> tuple[int, str]:
    return x, os.environ["DUANFLOW_REPLICA_ID"]


RUNS: dict[str, int] = {{}}


@app.function(timeout=20, concurrency=2)
def long_input(key: str, seconds: float) -> int:
    RUNS[key] = RUNS.get(key, 0) + 1
    time.sleep(seconds)
    return RUNS[key]


@app.function(timeout=20, concurrency=2)
def runs_of(key: str) -> int:
    return RUNS.get(key, 0)


@app.cls(timeout=10, concurrency=4)
class Model:
    """A lifecycle class: enter once per replica, exit at SIGTERM."""

    @df.enter()
    def load(self) -> None:
        self.enters = getattr(self, "enters", 0) + 1
        if os.environ.get("DUANFLOW_REPLICA_ID"):
            with (MARKS / "enters").open("a") as f:
                f.write(os.environ["DUANFLOW_REPLICA_ID"] + "\\n")

    @df.exit()
    def close(self) -> None:
        (MARKS / ("exited-" + os.environ["DUANFLOW_REPLICA_ID"])).write_text("drained")

    @df.method()
    def predict(self, x: int) -> tuple[int, int, int, int]:
        return x * 2, self.enters, LOADED_AT, os.getpid()

    @df.method()
    async def apredict(self, x: int) -> int:
        await asyncio.sleep(0)
        return x * 3
'''

SHORT_ACK_WAIT = {"slow_square": 2.0, "long_input": 1.5, "runs_of": 1.5}
"""Functions whose consumer gets a short ack_wait: a killed replica's inputs come back fast; long inputs must
heartbeat to keep theirs."""


@dataclass
class Stack:
    env: str
    app_name: str
    module: ModuleType
    nats_url: str
    creds: servers.NatsCredentials
    app_dir: Path
    marks: Path
    logs: Path
    replicas: list[subprocess.Popen[bytes]] = field(default_factory=list)


def consumer_config(env: str, app: str, spec: Any) -> ConsumerConfig:
    ack_wait = SHORT_ACK_WAIT.get(spec.name, spec.timeout_s + 30)
    return ConsumerConfig(
        durable_name=subjects.consumer_name(env, app, spec.name),
        deliver_policy=DeliverPolicy.ALL,
        ack_policy=AckPolicy.EXPLICIT,
        ack_wait=ack_wait,
        max_deliver=spec.retries + 5,
        filter_subject=subjects.invocation(env, app, spec.name),
        max_ack_pending=100_000,
    )


async def start_replica(st: Stack, function: str, nats_url: str = "") -> subprocess.Popen[bytes]:
    """One replica with the env an agent gives it (``nats_url``: another way to the server); returns once ready."""
    replica_id = new_replica_id()
    env = replica_env(
        nats_url=nats_url or st.nats_url,
        agent_password=st.creds.agent,
        spec=st.module.app._registry()[function].spec,
        env=st.env,
        app=st.app_name,
        module=st.module.__name__,
        app_dir=st.app_dir,
        replica_id=replica_id,
        FN_TEST_MARKS=str(st.marks),
    )
    proc = await spawn_ready(
        nats_url=st.nats_url,
        agent_password=st.creds.agent,
        replica_id=replica_id,
        env=env,
        cwd=st.app_dir,
        log_path=st.logs / f"{function}-{replica_id}.log",
    )
    st.replicas.append(proc)
    return proc


async def _setup(st: Stack) -> None:
    nc = await nats.connect(st.nats_url, user="service", password=st.creds.service)
    try:
        js = nc.jetstream()
        await ensure_streams(js)
        for fn in st.module.app._registry().values():
            await js.add_consumer(subjects.STREAM_INVOCATIONS, consumer_config(st.env, st.app_name, fn.spec))
    finally:
        await nc.close()
    for function in ("square", "add", "fails_on_odd", "asquare", "countdown", "acountdown", "Model", "long_input"):
        await start_replica(st, function)
    await start_replica(st, "runs_of")


@pytest.fixture(scope="module")
def stack(
    nats_server: tuple[servers.Proc, servers.NatsCredentials], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    token = uuid.uuid4().hex[:8]
    root = tmp_path_factory.mktemp("functions")
    app_dir, marks, logs = root / "app", root / "marks", root / "logs"
    for p in (app_dir, marks, logs):
        p.mkdir()
    module_name = f"functions_app_{token}"
    app_name = f"fn-{token}"
    (app_dir / f"{module_name}.py").write_text(textwrap.dedent(APP_SOURCE.format(app=app_name)))
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(app_dir))
        mp.setenv("DUANFLOW_NATS_URL", nats_server[0].address)
        mp.setenv("DUANFLOW_NATS_USER", "client")
        mp.setenv("DUANFLOW_NATS_PASSWORD", nats_server[1].client)
        mp.setenv("DUANFLOW_ENV", f"f{token}")
        mp.setenv("DUANFLOW_HOME", str(root / "home"))
        mp.delenv("DUANFLOW_REPLICA_ID", raising=False)
        module = importlib.import_module(module_name)
        _client.reset_client()
        st = Stack(f"f{token}", app_name, module, nats_server[0].address, nats_server[1], app_dir, marks, logs)
        try:
            asyncio.run(_setup(st))
            yield st
        finally:
            _client.reset_client()
            for proc in st.replicas:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait(10)


def test_map_yields_every_result_in_input_order(stack: Stack) -> None:
    assert list(stack.module.square.map(range(3000))) == [x * x for x in range(3000)]
    assert list(stack.module.square.map([])) == []


def test_map_of_several_iterables_starmap_and_kwargs(stack: Stack) -> None:
    assert list(stack.module.add.map([1, 2, 3], [10, 20, 30])) == [11, 22, 33]
    assert list(stack.module.add.starmap([(1, 2), (3, 4)], kwargs={"scale": 10})) == [30, 70]


def test_map_errors_raise_or_come_back_as_values(stack: Stack) -> None:
    with pytest.raises(stack.module.Odd, match="odd: 1"):
        list(stack.module.fails_on_odd.map(range(10)))
    out = list(stack.module.fails_on_odd.map(range(6), return_exceptions=True))
    assert [x for x in out if not isinstance(x, Exception)] == [0, 2, 4]
    assert [str(x) for x in out if isinstance(x, Exception)] == ["odd: 1", "odd: 3", "odd: 5"]


async def test_map_aio_unordered_and_async_functions(stack: Stack) -> None:
    got = [x async for x in stack.module.asquare.map.aio(range(500), order_outputs=False)]
    assert sorted(got) == [x * x for x in range(500)]
    assert [x async for x in stack.module.square.map.aio(range(5))] == [0, 1, 4, 9, 16]


def test_a_thousand_calls_share_one_module_load_and_one_enter(stack: Stack) -> None:
    model = stack.module.Model()
    first = model.predict.remote(1)
    outs = list(model.predict.map(range(1000)))
    assert [o[0] for o in outs] == [2 * x for x in range(1000)]
    assert {o[1:] for o in outs} == {first[1:]}, "every call saw the same instance, module and process"
    assert first[1] == 1
    replica_loads = (stack.marks / "loads").read_text().split()
    enters = (stack.marks / "enters").read_text().split()
    assert enters.count(enters[0]) == 1 and len(set(enters)) == len(enters)
    assert replica_loads.count(enters[0]) == 1
    assert model.apredict.remote(5) == 15
    assert model.predict.local(4)[0] == 8


def test_a_method_that_is_not_marked_is_refused(stack: Stack) -> None:
    with pytest.raises(AttributeError, match=r"no @df\.method 'load'"):
        stack.module.Model().load  # noqa: B018
    with pytest.raises(df.InvalidInputError, match="takes no arguments"):
        stack.module.Model(1)


def test_generators_stream_their_values_in_order(stack: Stack) -> None:
    assert list(stack.module.countdown.remote_gen(5)) == [5, 4, 3, 2, 1]
    got: list[int] = []
    with pytest.raises(ValueError, match="failed at 2"):
        for x in stack.module.countdown.remote_gen(5, fail_at=2):
            got.append(x)
    assert got == [5, 4, 3]
    with pytest.raises(df.InvalidInputError, match=r"remote_gen"):
        stack.module.countdown.remote(3)


async def test_async_generators_stream_with_aio(stack: Stack) -> None:
    assert [x async for x in stack.module.acountdown.remote_gen.aio(4)] == [4, 3, 2, 1]


def test_long_inputs_keep_their_lease(stack: Stack) -> None:
    # ack_wait is 1.5 s: without in_progress() heartbeats JetStream would hand the input out again meanwhile.
    key = uuid.uuid4().hex
    assert stack.module.long_input.remote(key, 4.0) == 1
    assert stack.module.long_input.remote(key, 0.0) == 2, "the 4 s input ran once, not twice"


async def test_undecodable_arguments_name_the_python_versions(stack: Stack) -> None:
    nc = await nats.connect(stack.nats_url, user="client", password=stack.creds.client)
    try:
        inbox = nc.new_inbox()
        sub = await nc.subscribe(inbox)
        inv = Invocation(call_id="fc-garbage", function="square", args=b"\x80\x05garbage", python="3.8")
        await nc.jetstream().publish(
            subjects.invocation(stack.env, stack.app_name, "square"), codec.encode(inv), headers={HDR_REPLY: inbox}
        )
        result = codec.decode((await sub.next_msg(timeout=10)).data, Result)
    finally:
        await nc.close()
    assert not result.ok and result.error is not None
    assert result.error.code == "deserialization_error"
    assert f"replica Python {sys.version_info.major}.{sys.version_info.minor}" in result.error.message
    assert "caller's 3.8: the versions differ" in result.error.message


def test_kill_9_mid_map_every_result_arrives_once_in_order(stack: Stack) -> None:
    async def two() -> list[subprocess.Popen[bytes]]:
        return [await start_replica(stack, "slow_square"), await start_replica(stack, "slow_square")]

    victim, survivor = asyncio.run(two())
    results: list[tuple[int, str]] = []
    for i, value in enumerate(stack.module.slow_square.map(range(2000))):
        results.append(value)
        if i == 300:
            victim.send_signal(signal.SIGKILL)
    assert victim.wait(10) == -signal.SIGKILL
    assert [v for v, _ in results] == [x * x for x in range(2000)]
    assert len(results) == 2000
    assert survivor.poll() is None


def test_sigterm_runs_exit_hooks_after_draining(stack: Stack) -> None:
    async def one() -> subprocess.Popen[bytes]:
        return await start_replica(stack, "Model")

    proc = asyncio.run(one())
    before = {p.name for p in stack.marks.glob("exited-*")}
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0
    exited = {p.name for p in stack.marks.glob("exited-*")} - before
    assert len(exited) == 1, "the stopped replica ran its @df.exit hook"


class SlowUplink:
    """A TCP relay to NATS that holds what the client sends for ``delay_s`` (what it receives passes at once).

    It stretches the moment between a client dropping a subscription and the server learning of it.
    """

    def __init__(self, upstream: str, delay_s: float) -> None:
        host, _, port = upstream.rpartition("://")[2].rpartition(":")
        self.upstream = (host, int(port))
        self.delay_s = delay_s
        self.server: asyncio.Server | None = None
        self.url = ""

    async def __aenter__(self) -> SlowUplink:
        self.server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        self.url = f"nats://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()

    async def _relay(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        server_r, server_w = await asyncio.open_connection(*self.upstream)
        loop = asyncio.get_running_loop()

        async def down() -> None:
            while data := await server_r.read(65536):
                client_w.write(data)
            client_w.close()

        task = asyncio.create_task(down())
        while data := await client_r.read(65536):
            loop.call_at(loop.time() + self.delay_s, server_w.write, data)
        loop.call_at(loop.time() + self.delay_s, server_w.close)
        await task


async def test_sigterm_with_open_pull_requests_strands_no_call(stack: Stack) -> None:
    """A draining replica keeps its inbox until its open pull requests are done, handing back what they bring.

    Unsubscribing while requests were still open at the server let a message reach a dead inbox, where it waited
    for ack_wait (40 s here) before anyone else could run it. The victim's uplink lags 0.3 s, so the server learns
    of an unsubscription late, as a busy server or a longer path would.
    """
    async with SlowUplink(stack.nats_url, 0.3) as uplink:
        victim = await start_replica(stack, "handoff", uplink.url)
        survivor = await start_replica(stack, "handoff")
        await _handoff_during_drain(stack, victim, survivor)


async def _handoff_during_drain(
    stack: Stack, victim: subprocess.Popen[bytes], survivor: subprocess.Popen[bytes]
) -> None:
    consumer = subjects.consumer_name(stack.env, stack.app_name, "handoff")
    nc = await nats.connect(stack.nats_url, user="service", password=stack.creds.service)
    js = nc.jetstream()

    async def both_pulling() -> bool:
        waiting: int = (await js.consumer_info(subjects.STREAM_INVOCATIONS, consumer)).num_waiting
        return waiting >= 2

    served: dict[str, int] = {}
    done = asyncio.Event()

    async def caller(first: int) -> None:
        n = first
        while not done.is_set():
            value, replica = await asyncio.wait_for(stack.module.handoff.remote.aio(n), 5.0)
            assert value == n
            served[replica] = served.get(replica, 0) + 1
            n += 1000

    calling: asyncio.Task[None] | None = None

    async def calls_answered(at_least: int) -> bool:
        assert calling is not None
        if calling.done():
            calling.result()  # a stranded call failed the caller's 5 s wait (ack_wait is 40 s): say so now
        return sum(served.values()) >= at_least

    try:
        await eventually(both_pulling, timeout=10)
        calling = asyncio.create_task(caller(0))  # one call at a time, as a steady stream of .remote() calls
        await eventually(lambda: _true(len(served) == 2 and sum(served.values()) >= 20), timeout=20)
        victim.send_signal(signal.SIGTERM)

        async def victim_exited() -> bool:
            await calls_answered(0)
            return victim.poll() is not None

        await eventually(victim_exited, timeout=20)
        after = sum(served.values())
        await eventually(lambda: calls_answered(after + 200), timeout=20)
        done.set()
        await calling
        assert victim.wait(5) == 0
        assert survivor.poll() is None

        async def nothing_pending() -> bool:
            info = await js.consumer_info(subjects.STREAM_INVOCATIONS, consumer)
            unfinished: int = info.num_ack_pending + info.num_pending
            return unfinished == 0

        await eventually(nothing_pending, timeout=5)
    finally:
        done.set()
        await nc.close()
        if survivor.poll() is None:
            survivor.kill()


async def _true(value: bool) -> bool:
    return value

"""Work queues against real worker replicas (``python -m duanflow._runtime``) on a real NATS server: jobs put from
the SDK run once each with a stable job id, a failing job is retried with backoff then dead-lettered with its error,
and the consumers are the ones the router creates at deploy."""

from __future__ import annotations

import asyncio
import dataclasses
import importlib
import os
import signal
import subprocess
import textwrap
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

import nats
import pytest
from duanflow import _client
from duanflow._local import servers
from duanflow._queue import decode_dead_letter
from duanflow_kit.streams import ensure_streams
from duanflow_proto import subjects
from duanflow_proto.messages.queue import DeadLetter
from duanflow_router.adapters.nats import queue_consumer_config
from fixtures.replicas import new_replica_id, replica_env, spawn_ready
from fixtures.waiting import eventually_sync
from nats.js.api import DeliverPolicy

pytestmark = pytest.mark.timeout(120)

KILLED_ACK_WAIT_S = 2.0

APP_SOURCE = """
import os
import time
from pathlib import Path

import duanflow as df
from duanflow._queue import current_job_id

app = df.App("{app}")
MARKS = Path(os.environ.get("QUEUE_TEST_MARKS", "."))
FAST = df.Retries(max_retries=0, initial_delay=0.05, max_delay=0.2)

inbox = df.Queue("{token}-inbox")
broken = df.Queue("{token}-broken", max_retries=2)
shaky = df.Queue("{token}-shaky", max_retries=3)
idle = df.Queue("{token}-idle")
durable = df.Queue("{token}-durable")


@app.worker(queue=inbox, concurrency=4, timeout=10)
def record(job):
    with (MARKS / "record").open("a") as f:
        f.write(f"{{current_job_id()}} {{job['n']}}\\n")
    return job["n"]


@app.worker(queue=durable, concurrency=4, timeout=10)
def slow_record(job):
    time.sleep(0.01)
    with (MARKS / "durable").open("a") as f:
        f.write(f"{{current_job_id()}} {{os.environ['DUANFLOW_REPLICA_ID']}}\\n")


@app.worker(queue=broken, timeout=10, retries=FAST)
def always_fails(job):
    with (MARKS / "fails").open("a") as f:
        f.write(current_job_id() + "\\n")
    raise ValueError(f"cannot process {{job['n']}}")


@app.worker(queue=shaky, timeout=10, retries=FAST)
async def fails_once(job):
    mark = MARKS / ("shaky-" + current_job_id())
    runs = int(mark.read_text()) + 1 if mark.exists() else 1
    mark.write_text(str(runs))
    if runs == 1:
        raise RuntimeError("first attempt fails")
"""


@dataclass
class Stack:
    env: str
    token: str
    app_name: str
    module: ModuleType
    nats_url: str
    creds: servers.NatsCredentials
    app_dir: Path
    marks: Path
    logs: Path
    replicas: list[subprocess.Popen[bytes]] = field(default_factory=list)


async def start_worker(st: Stack, function: str) -> subprocess.Popen[bytes]:
    """One worker replica with the env an agent gives it (as the router's StartReplica says); returns once ready."""
    spec = st.module.app._registry()[function].spec
    replica_id = new_replica_id()
    env = replica_env(
        nats_url=st.nats_url,
        agent_password=st.creds.agent,
        spec=spec,
        env=st.env,
        app=st.app_name,
        module=st.module.__name__,
        app_dir=st.app_dir,
        replica_id=replica_id,
        stream=subjects.STREAM_QUEUES,
        consumer=subjects.queue_consumer(st.env, spec.queue),
        QUEUE_TEST_MARKS=str(st.marks),
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
            cfg = queue_consumer_config(st.env, fn.spec)
            if fn.name == "slow_record":  # a killed replica's jobs come back fast
                cfg = dataclasses.replace(cfg, ack_wait=KILLED_ACK_WAIT_S)
            await js.add_consumer(subjects.STREAM_QUEUES, cfg)
    finally:
        await nc.close()
    for function in ("record", "always_fails", "fails_once"):
        await start_worker(st, function)


async def dead_letters(st: Stack, queue: str) -> list[DeadLetter]:
    """Every dead letter of ``queue`` (read with the service role, as the router does)."""
    nc = await nats.connect(st.nats_url, user="service", password=st.creds.service)
    try:
        js = nc.jetstream()
        subject = subjects.dead_letter(st.env, queue)
        info = await js.stream_info(subjects.STREAM_DEAD_LETTERS, subjects_filter=subject)
        count = int((info.state.subjects or {}).get(subject, 0))
        if not count:
            return []
        sub = await js.subscribe(subject, ordered_consumer=True, deliver_policy=DeliverPolicy.ALL)
        letters = []
        for _ in range(count):
            msg = await sub.next_msg(timeout=5)
            letters.append(decode_dead_letter(msg.data))
        await sub.unsubscribe()
        return letters
    finally:
        await nc.close()


@pytest.fixture(scope="module")
def stack(
    nats_server: tuple[servers.Proc, servers.NatsCredentials], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    token = "q" + uuid.uuid4().hex[:8]
    root = tmp_path_factory.mktemp("queues")
    app_dir, marks, logs = root / "app", root / "marks", root / "logs"
    for p in (app_dir, marks, logs):
        p.mkdir()
    module_name = f"queue_app_{token}"
    app_name = f"qa-{token}"
    (app_dir / f"{module_name}.py").write_text(textwrap.dedent(APP_SOURCE.format(app=app_name, token=token)))
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(app_dir))
        mp.setenv("DUANFLOW_NATS_URL", nats_server[0].address)
        mp.setenv("DUANFLOW_NATS_USER", "client")
        mp.setenv("DUANFLOW_NATS_PASSWORD", nats_server[1].client)
        mp.setenv("DUANFLOW_ENV", f"e{token}")
        mp.setenv("DUANFLOW_HOME", str(root / "home"))
        mp.delenv("DUANFLOW_REPLICA_ID", raising=False)
        module = importlib.import_module(module_name)
        _client.reset_client()
        st = Stack(f"e{token}", token, app_name, module, nats_server[0].address, nats_server[1], app_dir, marks, logs)
        try:
            asyncio.run(_setup(st))
            yield st
        finally:
            _client.reset_client()
            for proc in st.replicas:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait(10)


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def test_a_worker_runs_every_job_once_with_its_job_id(stack: Stack) -> None:
    queue = stack.module.inbox
    ids = queue.put_many([{"n": n} for n in range(200)])
    one = queue.put({"n": 200})
    assert len(set(ids)) == 200 and one not in ids

    def all_ran() -> bool:
        return len(_lines(stack.marks / "record")) >= 201

    eventually_sync(all_ran, timeout=60)
    runs = [line.split() for line in _lines(stack.marks / "record")]
    assert sorted(int(n) for _, n in runs) == list(range(201))
    assert {job_id: int(n) for job_id, n in runs} == {**{j: n for n, j in enumerate(ids)}, one: 200}
    eventually_sync(lambda: len(queue) == 0, timeout=30)


def test_len_counts_jobs_no_worker_took_yet(stack: Stack) -> None:
    queue = stack.module.idle
    assert len(queue) == 0
    queue.put_many([{"n": n} for n in range(3)])
    assert len(queue) == 3


def test_a_failing_job_is_retried_then_dead_lettered_with_its_error(stack: Stack) -> None:
    queue = stack.module.broken
    job_id = queue.put({"n": 7})

    letters = eventually_sync(lambda: asyncio.run(dead_letters(stack, queue.name)), timeout=60)
    assert len(letters) == 1
    letter = letters[0]
    assert letter.job_id == job_id
    assert letter.attempts == 3, "max_retries=2: three attempts in all"
    assert letter.error == "ValueError: cannot process 7"
    assert letter.exc_type == "builtins.ValueError"
    assert "always_fails" in letter.traceback and "cannot process 7" in letter.traceback
    assert _lines(stack.marks / "fails") == [job_id] * 3, "same job id on every attempt, never a 4th"
    eventually_sync(lambda: len(queue) == 0, timeout=30)


def test_a_job_that_fails_once_succeeds_on_its_retry(stack: Stack) -> None:
    queue = stack.module.shaky
    job_id = queue.put({"n": 1})
    mark = stack.marks / f"shaky-{job_id}"
    eventually_sync(lambda: mark.exists() and mark.read_text() == "2", timeout=30)
    eventually_sync(lambda: len(queue) == 0, timeout=30)
    assert asyncio.run(dead_letters(stack, queue.name)) == []


def test_jobs_of_a_worker_killed_mid_drain_all_complete(stack: Stack) -> None:
    queue = stack.module.durable
    victim = asyncio.run(start_worker(stack, "slow_record"))
    asyncio.run(start_worker(stack, "slow_record"))
    ids = queue.put_many([{"n": n} for n in range(400)])
    eventually_sync(lambda: len(_lines(stack.marks / "durable")) >= 40, timeout=30)
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait(10)

    def every_job_done() -> bool:
        return {line.split()[0] for line in _lines(stack.marks / "durable")} >= set(ids)

    eventually_sync(every_job_done, timeout=60)
    eventually_sync(lambda: len(queue) == 0, timeout=30)
    assert asyncio.run(dead_letters(stack, queue.name)) == []

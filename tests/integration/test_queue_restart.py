"""A queue loses no job when a worker replica is killed (``kill -9``) and the NATS server restarts (file storage,
same store) while the jobs drain: every job completes at least once under its stable job id (a small version of
``bench/queue_durability.py``). The test has its own NATS server, since it restarts it."""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import importlib
import os
import signal
import subprocess
import textwrap
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

import nats
import pytest
from duanflow import _client
from duanflow._local import servers
from duanflow_kit.streams import ensure_streams
from duanflow_proto import subjects
from duanflow_router.adapters.nats import queue_consumer_config
from fixtures.replicas import new_replica_id, replica_env, spawn_ready
from fixtures.waiting import eventually_sync

pytestmark = pytest.mark.timeout(180)

JOBS = 400
ACK_WAIT_S = 2.0
"""The consumer's lease: a killed replica's jobs (and jobs whose ack a restart lost) come back this soon."""

APP_SOURCE = """
import os
import time

import duanflow as df

app = df.App("{app}")
jobs = df.Queue("{token}-jobs")


@app.worker(queue=jobs, concurrency=2, timeout=10)
def record(job):
    time.sleep(0.01)
    path = os.path.join(os.environ["QUEUE_TEST_MARKS"], os.environ["DUANFLOW_REPLICA_ID"])
    with open(path, "a") as f:
        f.write(df.current_job_id() + "\\n")
"""


@dataclass
class Stack:
    root: Path
    env: str
    app_name: str
    module: ModuleType
    creds: servers.NatsCredentials
    nats: servers.Proc
    marks: Path
    replicas: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def restart_nats(self) -> None:
        """Stop the server and start it again on the same port with the same store."""
        port = int(self.nats.address.rsplit(":", 1)[1])
        self.nats.stop()
        self.nats = servers.start_nats(self.root / "nats", self.creds, port=port)

    def completions(self) -> collections.Counter[str]:
        """Successful completions per job id (a line cut short by the kill is not one)."""
        counts: collections.Counter[str] = collections.Counter()
        for path in self.marks.iterdir():
            lines = path.read_text().split("\n")
            counts.update(line for line in lines[:-1] if line)
        return counts


async def start_worker(st: Stack) -> subprocess.Popen[bytes]:
    spec = st.module.app._registry()["record"].spec
    replica_id = new_replica_id()
    env = replica_env(
        nats_url=st.nats.address,
        agent_password=st.creds.agent,
        spec=spec,
        env=st.env,
        app=st.app_name,
        module=st.module.__name__,
        app_dir=st.root / "app",
        replica_id=replica_id,
        stream=subjects.STREAM_QUEUES,
        consumer=subjects.queue_consumer(st.env, spec.queue),
        QUEUE_TEST_MARKS=str(st.marks),
    )
    proc = await spawn_ready(
        nats_url=st.nats.address,
        agent_password=st.creds.agent,
        replica_id=replica_id,
        env=env,
        cwd=st.root / "app",
        log_path=st.root / f"record-{replica_id}.log",
    )
    st.replicas.append(proc)
    return proc


async def _setup(st: Stack) -> None:
    nc = await nats.connect(st.nats.address, user="service", password=st.creds.service)
    try:
        js = nc.jetstream()
        await ensure_streams(js)
        spec = st.module.app._registry()["record"].spec
        await js.add_consumer(
            subjects.STREAM_QUEUES, dataclasses.replace(queue_consumer_config(st.env, spec), ack_wait=ACK_WAIT_S)
        )
    finally:
        await nc.close()


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    token = "r" + uuid.uuid4().hex[:8]
    app_dir, marks = tmp_path / "app", tmp_path / "marks"
    app_dir.mkdir()
    marks.mkdir()
    module_name = f"queue_restart_app_{token}"
    app_name = f"qr-{token}"
    (app_dir / f"{module_name}.py").write_text(textwrap.dedent(APP_SOURCE.format(app=app_name, token=token)))
    creds = servers.NatsCredentials.generate()
    proc = servers.start_nats(tmp_path / "nats", creds)
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(app_dir))
        mp.setenv("DUANFLOW_NATS_URL", proc.address)
        mp.setenv("DUANFLOW_NATS_USER", "client")
        mp.setenv("DUANFLOW_NATS_PASSWORD", creds.client)
        mp.setenv("DUANFLOW_ENV", f"e{token}")
        mp.setenv("DUANFLOW_HOME", str(tmp_path / "home"))
        mp.delenv("DUANFLOW_REPLICA_ID", raising=False)
        st = Stack(tmp_path, f"e{token}", app_name, importlib.import_module(module_name), creds, proc, marks)
        _client.reset_client()
        try:
            asyncio.run(_setup(st))
            yield st
        finally:
            _client.reset_client()
            for rp in st.replicas:
                if rp.poll() is None:
                    rp.kill()
                    rp.wait(10)
            st.nats.stop()


def test_no_job_is_lost_to_a_killed_worker_and_a_nats_restart(stack: Stack) -> None:
    victim = asyncio.run(start_worker(stack))
    asyncio.run(start_worker(stack))
    queue = stack.module.jobs
    ids = queue.put_many([{"n": n} for n in range(JOBS)])
    assert len(set(ids)) == JOBS

    eventually_sync(lambda: len(stack.completions()) >= JOBS // 10, timeout=60)
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait(10)
    asyncio.run(start_worker(stack))

    eventually_sync(lambda: len(stack.completions()) >= JOBS // 3, timeout=60)
    done_before = len(stack.completions())
    stack.restart_nats()
    assert done_before < JOBS, "the restart must happen while jobs are still draining"

    eventually_sync(lambda: stack.completions().keys() >= set(ids), timeout=90)
    eventually_sync(lambda: len(queue) == 0, timeout=30)
    counts = stack.completions()
    missing = [job_id for job_id in ids if counts[job_id] == 0]
    assert missing == []
    assert set(counts) == set(ids), "only the jobs put ran"


def test_put_many_rides_out_a_nats_restart_and_stores_each_job_once(stack: Stack) -> None:
    queue = stack.module.jobs  # no worker runs it in this test: every stored job stays in the stream
    assert len(queue) == 0  # the client is connected before the server goes away
    port = int(stack.nats.address.rsplit(":", 1)[1])
    stack.nats.stop()
    nc = _client.get_client()._nc
    eventually_sync(lambda: not nc.is_connected, timeout=10)  # the client saw the server go
    result: list[list[str]] = []
    putter = threading.Thread(target=lambda: result.append(queue.put_many([{"n": n} for n in range(3000)])))
    putter.start()
    try:
        assert not result, "nothing can be stored while the server is down"
    finally:
        stack.nats = servers.start_nats(stack.root / "nats", stack.creds, port=port)
    putter.join(60)
    assert not putter.is_alive() and len(result) == 1
    assert len(set(result[0])) == 3000
    eventually_sync(lambda: len(queue) == 3000, timeout=30)

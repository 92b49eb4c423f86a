"""Which direct calls (the gateway's fast path) an endpoint replica takes, and which it sends to the stream."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

from duanflow._inbox import more_to_read, publish_soon
from duanflow._runtime.config import RuntimeConfig
from duanflow._runtime.pull import Puller
from duanflow._runtime.worker import Target, Worker
from duanflow_proto.messages.release import FunctionSpec
from nats.aio.msg import Msg


class TaskGroup:
    def __init__(self) -> None:
        self.started: list[str] = []

    def create_task(self, coro: Coroutine[Any, Any, Any]) -> None:
        frame = getattr(coro, "cr_frame", None)
        direct = frame is not None and frame.f_locals.get("direct")
        self.started.append("direct" if direct else "stream")
        coro.close()


class Nats:
    def __init__(self) -> None:
        self.busy: list[tuple[str, dict[str, str] | None]] = []

    async def publish(self, subject: str, data: bytes, headers: dict[str, str] | None = None) -> None:
        assert data == b""
        self.busy.append((subject, headers))


def echo(request: Any) -> Any:
    return request


def replica(concurrency: int) -> tuple[Worker, TaskGroup, Nats]:
    config = RuntimeConfig(
        nats_url="nats://127.0.0.1:1",
        nats_user="",
        nats_password="",
        replica_id="rp-1",
        env="main",
        app="a",
        release="",
        function="echo",
        module="m",
        stream="DUANFLOW_INV",
        consumer="fn_main_a_echo",
        concurrency=concurrency,
    )
    worker = Worker(config, Target(raw_f=echo, spec=FunctionSpec(name="echo", kind="endpoint")))
    tg, nc = TaskGroup(), Nats()
    worker._tg = tg  # type: ignore[assignment]
    worker._nc = nc
    return worker, tg, nc


def call(reply: str) -> Msg:
    return Msg(None, subject="duanflow.direct.main.a.echo", reply=reply, data=b"{}")  # type: ignore[arg-type]


async def settle() -> None:
    for _ in range(3):
        await asyncio.sleep(0)


async def test_free_slots_take_direct_calls_and_a_full_replica_answers_busy() -> None:
    worker, tg, nc = replica(concurrency=2)
    worker._on_direct(call("r1"))
    worker._on_direct(call("r2"))
    worker._on_direct(call("r3"))
    await settle()
    assert tg.started == ["direct", "direct"]
    assert nc.busy == [("r3", {"Df-Busy": "1"})]
    assert (worker._busy, worker._direct_busy, worker._direct_served) == (2, 2, 2)


async def test_while_the_stream_feeds_the_replica_direct_calls_queue_there_too() -> None:
    worker, tg, nc = replica(concurrency=4)
    worker._on_msg(call("stream-input"))  # an input from the stream (its reply is JetStream's ack subject)
    worker._on_direct(call("r1"))
    await settle()
    assert tg.started == ["stream"] and [r for r, _ in nc.busy] == ["r1"]
    worker._from_stream_at -= 1.0  # the stream went quiet
    worker._on_direct(call("r2"))
    await settle()
    assert tg.started[-1] == "direct" and len(nc.busy) == 1


async def test_a_draining_replica_takes_no_direct_call() -> None:
    worker, tg, nc = replica(concurrency=4)
    worker.stopping.set()
    worker._on_direct(call("r1"))
    await settle()
    assert not tg.started and [r for r, _ in nc.busy] == ["r1"]


class Flushed:
    """The parts of a nats-py client that ``publish_soon`` and ``more_to_read`` use."""

    def __init__(self) -> None:
        self._flush_queue: asyncio.Queue[asyncio.Future[None]] = asyncio.Queue(maxsize=1024)
        self._pending: list[bytes] = []
        self._pending_data_size = 0
        self._max_pending_size = 1024
        self.is_connected = True
        self.stats = {"out_msgs": 0, "out_bytes": 0}
        self._ps = type("Parser", (), {"buf": bytearray()})()


async def test_publish_soon_queues_for_one_flush_and_refuses_past_the_pending_limit() -> None:
    nc = Flushed()
    assert publish_soon(nc, "_INBOX.a.1", b"one") and publish_soon(nc, "_INBOX.a.2", b"two", {"Df-Busy": "1"})
    assert nc._pending == [
        b"PUB _INBOX.a.1  3\r\none\r\n",
        b"HPUB _INBOX.a.2  24 27\r\nNATS/1.0\r\nDf-Busy: 1\r\n\r\ntwo\r\n",
    ]
    assert nc._flush_queue.qsize() == 1 and nc.stats["out_msgs"] == 2  # one wake-up of the flusher for both
    assert not publish_soon(nc, "_INBOX.a.3", b"x" * 1024)  # over the pending buffer: the caller publishes
    nc.is_connected = False
    assert not publish_soon(nc, "_INBOX.a.4", b"four") and len(nc._pending) == 2


def test_more_to_read_sees_the_rest_of_the_read() -> None:
    nc = Flushed()
    assert not more_to_read(nc)
    nc._ps.buf.extend(b"MSG x 1 2\r\n")
    assert more_to_read(nc) and not more_to_read(object())


async def test_ack_next_now_asks_for_the_free_slots_or_undoes_its_credit() -> None:
    nc = Flushed()
    nc.new_inbox = lambda: "_INBOX.p"  # type: ignore[attr-defined]
    puller = Puller(nc, "DUANFLOW_INV", "fn_main_a_f", lambda msg: None)
    puller._inbox, puller._sub = "_INBOX.p", object()
    done = Msg(None, subject="duanflow.inv.main.a.f", reply="$JS.ACK.x.1")  # type: ignore[arg-type]
    assert puller.ack_next_now(done, 2) and puller.credit == 2
    cmd = nc._pending[-1]
    assert cmd.startswith(b"PUB $JS.ACK.x.1 _INBOX.p.1 ") and b"+NXT " in cmd and b'"batch": 2' in cmd
    assert puller.ack_next_now(done, 2) and nc._pending[-1] == b"PUB $JS.ACK.x.1  0\r\n\r\n"  # a plain ack
    nc._max_pending_size = 1  # the flusher's buffer is full: nothing sent, nothing owed
    assert not puller.ack_next_now(done, 5) and puller.credit == 2

"""The gateway's NATS invoker with a stand-in connection: no PubAck on a fast call, a late confirmation of a silent
one, heartbeats, streams, and the statuses a caller gets when the stream refuses the call (503), the replica goes
silent mid-request (502) or the deadline passes (504)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import pytest
from duanflow_gateway.adapters import nats as gw_nats
from duanflow_gateway.domain import BadGatewayError
from duanflow_proto import codec
from duanflow_proto.errors import DeadlineExceededError, UnavailableError
from duanflow_proto.messages.invocation import Invocation, Result

pytestmark = pytest.mark.timeout(10)


@dataclass
class Msg:
    subject: str
    data: bytes = b""
    headers: dict[str, str] | None = None


@dataclass
class FakeNats:
    published: list[tuple[str, str, dict[str, str]]] = field(default_factory=list)
    sent: asyncio.Event = field(default_factory=asyncio.Event)

    def new_inbox(self) -> str:
        return "_INBOX.gw"

    async def subscribe(self, subject: str, **kwargs: Any) -> Any:
        return FakeSub()

    async def publish(self, subject: str, data: bytes, reply: str = "", headers: dict[str, str] | None = None) -> None:
        self.published.append((subject, reply, headers or {}))
        self.sent.set()


class FakeSub:
    _cb = None
    _pending_size = 0
    _pending_queue: Any = None

    async def unsubscribe(self) -> None:
        return None


async def started() -> tuple[gw_nats.NatsInvoker, FakeNats]:
    nc = FakeNats()
    inv = gw_nats.NatsInvoker(nc, None)  # type: ignore[arg-type]
    await inv.start()
    return inv, nc


def result(**fields: Any) -> bytes:
    return codec.encode(Result(call_id="fc-1", ok=True, codec="json", value=b"1", **fields))


async def test_fast_call_asks_for_no_ack() -> None:
    inv, nc = await started()
    task = asyncio.ensure_future(inv.invoke("duanflow.inv.e.a.f", Invocation(call_id="fc-1", function="f"), 5))
    await nc.sent.wait()
    _, reply, headers = nc.published[0]
    assert reply == "" and headers["Df-Reply"] == "_INBOX.gw.fc-1" and headers["Nats-Msg-Id"] == "fc-1"
    inv._on_result(Msg("_INBOX.gw.fc-1", result(heartbeat=True, final=False)))  # type: ignore[arg-type]
    inv._on_result(Msg("_INBOX.gw.fc-1", result()))  # type: ignore[arg-type]
    got = await task
    assert got.ok and got.value == b"1" and inv.in_flight == 0
    assert len(nc.published) == 1


async def confirmed(nc: FakeNats) -> tuple[str, dict[str, str]]:
    """The second publish of a call that heard nothing: the same message, now asking for its PubAck."""
    while len(nc.published) < 2:
        nc.sent.clear()
        await nc.sent.wait()
    subject, reply, headers = nc.published[1]
    assert subject == nc.published[0][0] and headers == nc.published[0][2]
    return reply, headers


async def test_silent_call_is_confirmed_with_the_same_msg_id(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gw_nats, "CONFIRM_AFTER_S", 0.05)
    inv, nc = await started()
    task = asyncio.ensure_future(inv.invoke("duanflow.inv.e.a.f", Invocation(call_id="fc-1", function="f"), 5))
    reply, headers = await confirmed(nc)
    assert reply == "_INBOX.gw.fc-1.ack" and headers["Nats-Msg-Id"] == "fc-1"
    inv._on_result(Msg(reply, b'{"stream":"DUANFLOW_INV","seq":1,"duplicate":true}'))  # type: ignore[arg-type]
    await asyncio.sleep(0.1)  # a workload: the stored call waits for its replica, with no third publish
    assert not task.done() and len(nc.published) == 2
    inv._on_result(Msg("_INBOX.gw.fc-1", result()))  # type: ignore[arg-type]
    assert (await task).ok


async def test_no_stream_is_503(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gw_nats, "CONFIRM_AFTER_S", 0.05)
    inv, nc = await started()
    task = asyncio.ensure_future(inv.invoke("duanflow.inv.e.a.f", Invocation(call_id="fc-1", function="f"), 5))
    reply, _ = await confirmed(nc)
    inv._on_result(Msg(reply, b"", {"Status": "503"}))  # type: ignore[arg-type]
    with pytest.raises(UnavailableError):
        await task


async def test_no_ack_to_the_confirmation_is_503(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gw_nats, "CONFIRM_AFTER_S", 0.05)
    monkeypatch.setattr(gw_nats, "PUBLISH_TIMEOUT_S", 0.05)
    inv, _ = await started()
    with pytest.raises(UnavailableError, match="did not acknowledge"):
        await inv.invoke("duanflow.inv.e.a.f", Invocation(call_id="fc-1", function="f"), 5)


async def test_deadline_is_504() -> None:
    inv, _ = await started()
    with pytest.raises(DeadlineExceededError):
        await inv.invoke("duanflow.inv.e.a.f", Invocation(call_id="fc-1", function="f"), 0.05)
    assert inv.in_flight == 0


async def test_silent_replica_after_a_heartbeat_is_502(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gw_nats, "LIVENESS_S", 0.05)
    inv, nc = await started()
    task = asyncio.ensure_future(inv.invoke("duanflow.inv.e.a.f", Invocation(call_id="fc-1", function="f"), 5))
    await nc.sent.wait()
    inv._on_result(Msg("_INBOX.gw.fc-1.ack", b'{"stream":"S","seq":1}'))  # type: ignore[arg-type]
    inv._on_result(Msg("_INBOX.gw.fc-1", result(heartbeat=True, final=False)))  # type: ignore[arg-type]
    with pytest.raises(BadGatewayError):
        await task


async def test_stream_stays_open_until_closed() -> None:
    inv, nc = await started()
    task = asyncio.ensure_future(inv.invoke("duanflow.inv.e.a.f", Invocation(call_id="fc-1", function="f"), 5))
    await nc.sent.wait()
    inv._on_result(Msg("_INBOX.gw.fc-1.ack", b'{"stream":"S","seq":1}'))  # type: ignore[arg-type]
    inv._on_result(Msg("_INBOX.gw.fc-1", result(stream=True, final=False)))  # type: ignore[arg-type]
    inv._on_result(Msg("_INBOX.gw.fc-1", result(stream=True, final=True, seq=1)))  # type: ignore[arg-type]
    first = await task
    assert first.stream and not first.final and inv.in_flight == 1
    last = await inv.next("fc-1")
    assert last.final
    inv.close("fc-1")
    assert inv.in_flight == 0


async def test_garbage_result_is_502() -> None:
    inv, nc = await started()
    task = asyncio.ensure_future(inv.invoke("duanflow.inv.e.a.f", Invocation(call_id="fc-1", function="f"), 5))
    await nc.sent.wait()
    inv._on_result(Msg("_INBOX.gw.fc-1", b"\x00garbage"))  # type: ignore[arg-type]
    with pytest.raises(BadGatewayError):
        await task


DIRECT = "duanflow.direct.e.a.f"


async def test_direct_call_goes_to_the_warm_replicas_and_nowhere_else() -> None:
    inv, nc = await started()
    call = Invocation(call_id="fc-1", function="f")
    task = asyncio.ensure_future(inv.invoke("duanflow.inv.e.a.f", call, 5, direct=DIRECT))
    await nc.sent.wait()
    subject, reply, headers = nc.published[0]
    assert subject == DIRECT and reply == "_INBOX.gw.fc-1.ack" and headers["Df-Reply"] == "_INBOX.gw.fc-1"
    inv._on_result(Msg("_INBOX.gw.fc-1", result()))  # type: ignore[arg-type]
    assert (await task).ok and len(nc.published) == 1 and inv.in_flight == 0


@pytest.mark.parametrize(
    "answer",
    [{"Df-Busy": "1"}, {"Status": "503", "Description": "No Responders"}],
    ids=["replicas-busy", "no-replica"],
)
async def test_direct_call_nobody_takes_goes_to_the_stream(answer: dict[str, str]) -> None:
    inv, nc = await started()
    call = Invocation(call_id="fc-1", function="f")
    task = asyncio.ensure_future(inv.invoke("duanflow.inv.e.a.f", call, 5, direct=DIRECT))
    await nc.sent.wait()
    nc.sent.clear()
    inv._on_result(Msg("_INBOX.gw.fc-1.ack", b"", answer))  # type: ignore[arg-type]
    await nc.sent.wait()
    subject, reply, headers = nc.published[1]
    assert subject == "duanflow.inv.e.a.f" and reply == "" and headers["Nats-Msg-Id"] == "fc-1"
    assert not task.done()
    inv._on_result(Msg("_INBOX.gw.fc-1", result()))  # type: ignore[arg-type]
    assert (await task).ok and len(nc.published) == 2


async def test_direct_call_sent_to_the_stream_is_confirmed_when_silent(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gw_nats, "CONFIRM_AFTER_S", 0.05)
    inv, nc = await started()
    call = Invocation(call_id="fc-1", function="f")
    task = asyncio.ensure_future(inv.invoke("duanflow.inv.e.a.f", call, 5, direct=DIRECT))
    await nc.sent.wait()
    inv._on_result(Msg("_INBOX.gw.fc-1.ack", b"", {"Df-Busy": "1"}))  # type: ignore[arg-type]
    while len(nc.published) < 3:
        nc.sent.clear()
        await nc.sent.wait()
    subject, reply, _ = nc.published[2]
    assert subject == "duanflow.inv.e.a.f" and reply == "_INBOX.gw.fc-1.ack"
    inv._on_result(Msg(reply, b"", {"Status": "503"}))  # type: ignore[arg-type]
    with pytest.raises(UnavailableError):
        await task


async def test_direct_call_a_replica_took_waits_for_its_deadline_not_a_confirmation(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(gw_nats, "CONFIRM_AFTER_S", 0.01)
    inv, nc = await started()
    call = Invocation(call_id="fc-1", function="f")
    with pytest.raises(DeadlineExceededError):
        await inv.invoke("duanflow.inv.e.a.f", call, 0.2, direct=DIRECT)
    assert len(nc.published) == 1

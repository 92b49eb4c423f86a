"""The sync lane's per-call bookkeeping and the publish shortcut's refusals, without a server (the lane against a
real NATS server is in tests/integration/test_remote.py)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import pytest
from duanflow._inbox import publish_now
from duanflow._lane import Refused, _Call


def _msg(data: bytes, headers: dict[str, str] | None = None) -> Any:
    return SimpleNamespace(data=data, headers=headers)


async def test_a_refused_confirmation_fails_the_call() -> None:
    loop = asyncio.get_running_loop()
    call = _Call(loop, "subj", b"body", {}, loop.time() + 5)
    waiting = asyncio.ensure_future(call.wait(loop.time() + 5))
    await asyncio.sleep(0)
    call.on_ack(_msg(b"", {"Status": "503"}))
    with pytest.raises(Refused) as info:
        await waiting
    assert info.value.status == "503"

    too_big = _Call(loop, "subj", b"body", {}, loop.time() + 5)
    too_big.on_ack(_msg(b'{"error":{"code":400,"err_code":10054,"description":"message size exceeds maximum"}}'))
    with pytest.raises(Refused) as info:
        await too_big.wait(loop.time() + 5)
    assert b"10054" in info.value.data


async def test_a_stored_confirmation_keeps_the_call_waiting_and_the_first_result_counts() -> None:
    loop = asyncio.get_running_loop()
    call = _Call(loop, "subj", b"body", {}, loop.time() + 5)
    call.on_ack(_msg(b'{"stream":"DUANFLOW_INVOCATIONS","seq":7}'))
    assert call.acked
    assert await call.wait(loop.time() + 0.01) is None, "no result yet: the wait times out"
    call.set(b"first")
    call.set(b"again, after a redelivery")
    assert await call.wait(loop.time() + 5) == b"first"


async def test_a_result_beats_a_later_refusal() -> None:
    loop = asyncio.get_running_loop()
    call = _Call(loop, "subj", b"body", {}, loop.time() + 5)
    call.set(b"result")
    call.on_ack(_msg(b"", {"Status": "503"}))
    assert await call.wait(loop.time() + 5) == b"result"


def test_publish_now_leaves_anything_but_an_idle_tcp_connection_to_nats_py() -> None:
    not_tcp = SimpleNamespace(_transport=object(), _pending_data_size=0, is_connected=True)
    assert publish_now(not_tcp, "subj", b"x") is False
    no_transport = SimpleNamespace(_pending_data_size=0, is_connected=True)
    assert publish_now(no_transport, "subj", b"x") is False

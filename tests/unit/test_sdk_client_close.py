"""A closed client: its loop is gone, and a call made afterwards says so instead of waiting forever."""

from __future__ import annotations

import asyncio

import pytest
from duanflow._client import Client
from duanflow._errors import UnavailableError


async def _never() -> None:
    await asyncio.Event().wait()


def test_close_ends_the_loop_and_later_calls_raise_a_clear_error() -> None:
    client = Client()
    client.close()
    client.close()  # idempotent
    assert client._loop.is_closed() and not client._thread.is_alive()
    with pytest.raises(UnavailableError, match="client is closed"):
        client.run(_never)


async def test_a_closed_client_refuses_async_calls_too() -> None:
    client = Client()
    client.close()
    with pytest.raises(UnavailableError, match="client is closed"):
        await client.run_async(_never)

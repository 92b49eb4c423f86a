"""A service task that is cancelled stops the way SIGTERM stops it, even when the cancel itself gets lost.

A cancel thrown into a starting service can vanish inside a library (Python 3.11's ``asyncio.wait_for`` drops one
that meets a result), and FastStream's loop then runs on; the service turns a cancel into its exit flag instead.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

from duanflow_kit.service import Service
from duanflow_kit.settings import BaseSettings


async def test_a_cancelled_service_stops_even_when_its_startup_loses_the_cancel(nats_server: Any) -> None:
    proc, creds = nats_server
    settings = BaseSettings(nats_url=proc.address, nats_user="service", nats_password=creds.service)
    service = Service("cancel-test", settings)
    entered, closed = asyncio.Event(), asyncio.Event()

    @contextlib.asynccontextmanager
    async def lifespan(svc: Service) -> AsyncIterator[None]:
        entered.set()
        with contextlib.suppress(asyncio.CancelledError):  # a library that loses the cancel on its way
            await asyncio.sleep(0.3)
        try:
            yield
        finally:
            closed.set()

    task = asyncio.create_task(service.run(lifespan))
    await asyncio.wait_for(entered.wait(), 10)
    task.cancel()
    done, _ = await asyncio.wait({task}, timeout=15)
    assert done, "the service ran on after it was cancelled"
    assert task.cancelled()
    assert closed.is_set()  # its lifespan closed its resources
    assert service.broker._connection is None or service.broker._connection.is_closed

"""``stop_tasks``: a loop whose cancel was lost (as Python 3.11's ``wait_for`` can lose one) still ends."""

from __future__ import annotations

import asyncio
import contextlib

from duanflow_kit.service import stop_tasks


async def test_a_task_that_loses_its_first_cancel_is_cancelled_again() -> None:
    turns = 0

    async def loop() -> None:
        nonlocal turns
        while True:
            turns += 1
            if turns == 1:
                with contextlib.suppress(asyncio.CancelledError):  # the first cancel is lost on its way
                    await asyncio.sleep(10)
            else:
                await asyncio.sleep(10)

    task = asyncio.create_task(loop())
    await asyncio.sleep(0)
    await asyncio.wait_for(stop_tasks(task, None, again_s=0.05), 5)
    assert task.cancelled() and turns >= 2


async def test_a_task_that_failed_is_waited_for_and_its_error_retrieved() -> None:
    async def fail() -> None:
        raise RuntimeError("boom")

    task = asyncio.create_task(fail())
    await asyncio.sleep(0)
    await stop_tasks(task)
    assert isinstance(task.exception(), RuntimeError)

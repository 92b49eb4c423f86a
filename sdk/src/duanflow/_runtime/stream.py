"""Generator functions called from Python (``f.remote_gen(...)``): each yield goes to the caller as it comes.

Every yielded value is one ``Result(stream=True, final=False, seq=n)`` on the caller's reply subject; the last
message is ``Result(final=True)`` carrying the error when the generator raised. A generator that runs again
(its replica died before the ack) sends its values again with the same ``seq``: callers skip the ones they have.
The whole generator shares the function's timeout.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING, Any, Final

import cloudpickle
from duanflow_proto.errors import FunctionTimeoutError
from duanflow_proto.messages.invocation import CODEC_CLOUDPICKLE, Invocation, Result

if TYPE_CHECKING:
    from duanflow._runtime.worker import Worker

_END: Final = object()


class _Failed:
    __slots__ = ("exc",)

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


async def run_generator(worker: Worker, inv: Invocation, reply: str, gen: Any, started: float) -> Result:
    """Send every value of ``gen`` (a generator or async generator) to ``reply``; return the final Result."""
    from duanflow._runtime.worker import remote_error

    seq = 0
    deadline = started + worker.config.timeout_s

    async def send(value: Any) -> None:
        nonlocal seq
        item = Result(
            call_id=inv.call_id,
            ok=True,
            value=cloudpickle.dumps(value),
            codec=CODEC_CLOUDPICKLE,
            stream=True,
            final=False,
            seq=seq,
            replica_id=worker.config.replica_id,
            simulated_gpu=worker.simulated,
        )
        seq += 1
        if reply:
            await worker._answer(reply, item)

    def final(**fields: Any) -> Result:
        return Result(
            call_id=inv.call_id,
            stream=True,
            final=True,
            seq=seq,
            replica_id=worker.config.replica_id,
            simulated_gpu=worker.simulated,
            duration_us=int((time.monotonic() - started) * 1e6),
            **fields,
        )

    try:
        async with asyncio.timeout(worker.config.timeout_s):
            if hasattr(gen, "__anext__"):
                async for value in gen:
                    await send(value)
            else:
                async for value in _from_thread(worker, gen, deadline):
                    await send(value)
    except TimeoutError:
        err = FunctionTimeoutError(
            f"{worker.config.function} ran past its timeout of {worker.config.timeout_s:g}s",
            details={"call_id": inv.call_id},
        )
        return final(ok=False, error=err.to_reply())
    except Exception as exc:
        return final(ok=False, error=remote_error(exc))
    return final(ok=True)


async def _from_thread(worker: Worker, gen: Iterator[Any], deadline: float) -> AsyncIterator[Any]:
    """Iterate a sync generator on a worker thread, handing its values to the loop as they come."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[Any] = asyncio.Queue()
    stop = threading.Event()

    def pump() -> None:
        try:
            for value in gen:
                loop.call_soon_threadsafe(queue.put_nowait, value)
                if stop.is_set() or time.monotonic() > deadline:
                    break
        except BaseException as exc:
            loop.call_soon_threadsafe(queue.put_nowait, _Failed(exc))
            return
        loop.call_soon_threadsafe(queue.put_nowait, _END)

    fut = loop.run_in_executor(worker._executor, pump)
    try:
        while True:
            value = await queue.get()
            if value is _END:
                break
            if isinstance(value, _Failed):
                raise value.exc
            yield value
    finally:
        stop.set()
        if not fut.done():
            worker._replace_executor()

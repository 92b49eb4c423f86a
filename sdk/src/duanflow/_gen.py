"""``f.remote_gen(...)``: iterate what a generator function yields on its replica, as it yields it.

The replica sends each value as ``Result(stream=True, final=False, seq=n)`` and ends with ``Result(final=True)``
(carrying the error if the generator raised). A generator re-run after a replica died sends its values again with
the same ``seq``: the ones already yielded here are skipped.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import TYPE_CHECKING, Any, Generic, ParamSpec, TypeVar

import cloudpickle
from duanflow_proto import codec
from duanflow_proto.messages.invocation import Result

from duanflow._client import Client, Target, ensure_blocking_allowed, get_client, unwrap_result
from duanflow._errors import FunctionTimeoutError

if TYPE_CHECKING:
    from duanflow._function import Function

P = ParamSpec("P")
R = TypeVar("R")


class GenRun:
    """One generator call: messages land here from the client loop; the caller takes them in ``seq`` order."""

    def __init__(self, client: Client, target: Target, label: str, wake: Callable[[], None]) -> None:
        self.client = client
        self.target = target
        self.label = label
        self._wake = wake
        self._lock = threading.Lock()
        self._inbox: list[bytes] = []
        self._error: BaseException | None = None
        self._items: dict[int, Result] = {}
        self._final: Result | None = None
        self.next_seq = 0
        self.last_progress = time.monotonic()
        self.call_id = ""

    def on_data(self, data: bytes) -> None:
        """One message of the stream (read loop)."""
        with self._lock:
            self._inbox.append(data)
        self._wake()

    def on_error(self, exc: BaseException) -> None:
        """The invocation could not be published."""
        with self._lock:
            self._error = exc
        self._wake()

    def ready(self) -> list[Any]:
        """Values that can be yielded now, in order; raises the generator's error when it is next."""
        with self._lock:
            arrived, self._inbox = self._inbox, []
            error = self._error
        if error is not None:
            raise error
        for data in arrived:
            self.last_progress = time.monotonic()
            result = codec.decode(data, Result)
            if result.heartbeat:
                continue
            if result.final:
                self._final = result
            elif result.seq >= self.next_seq:
                self._items.setdefault(result.seq, result)
        out: list[Any] = []
        while self.next_seq in self._items:
            item = self._items.pop(self.next_seq)
            out.append(unwrap_result(item, self.label, self.target.gpu_label))
            self.next_seq += 1
        return out

    @property
    def finished(self) -> bool:
        """True once the final message arrived and every value before it was taken."""
        return self._final is not None and self.next_seq >= self._final.seq

    def finish(self) -> None:
        """Raise the generator's error, if it ended with one."""
        final = self._final
        if final is not None and not final.ok:
            unwrap_result(final, self.label, self.target.gpu_label)
        if final is not None and final.ok and not final.stream:
            raise TypeError(f"{self.label} is not a generator function: call it with .remote()")

    def stalled(self) -> bool:
        """True when nothing has come for longer than the function may run."""
        return time.monotonic() - self.last_progress > self.target.wait_s


async def _start(
    client: Client, fn: Function[..., Any], payload: bytes, run_factory: Callable[[Target], GenRun]
) -> GenRun:
    app, name, env = fn._target(client)
    target = client._targets.get((env, app, name)) or await client.resolve(app, name, env, fn._spec)
    run = run_factory(target)
    call_id = client.new_call_id()
    from duanflow_proto.messages.invocation import Invocation

    from duanflow._client import PYTHON, _encode_invocation

    body = _encode_invocation(
        Invocation(
            call_id=call_id,
            function=target.spec.name,
            args=payload,
            deadline_ms=int((time.time() + target.wait_s) * 1000),
            python=PYTHON,
            method=fn._method,
        )
    )
    client._pending[call_id] = run
    run.call_id = call_id
    try:
        await client.send(target, body, call_id, call_id)
    except BaseException:
        client._pending.pop(call_id, None)
        raise
    return run


class RemoteGen(Generic[P, R]):
    """``for x in f.remote_gen(...)``; ``async for x in f.remote_gen.aio(...)``."""

    __slots__ = ("_fn",)

    def __init__(self, fn: Function[P, R]) -> None:
        self._fn = fn

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> Iterator[Any]:
        """Run the generator on a replica; yield its values here as they come.

        Example::

            for token in generate.remote_gen("hello"):
                print(token, end="")
        """
        fn = self._fn
        ensure_blocking_allowed(f"{fn.label}.remote_gen()", f"`async for x in {fn.label}.remote_gen.aio(...)`")
        return self._iterate(cloudpickle.dumps((args, kwargs)))

    def _iterate(self, payload: bytes) -> Iterator[Any]:
        fn = self._fn
        client = get_client()
        cond = threading.Condition()
        flag = [False]

        def wake() -> None:
            with cond:
                flag[0] = True
                cond.notify()

        run = client.run(_start, client, fn, payload, lambda t: GenRun(client, t, fn.label, wake))
        try:
            while True:
                yield from run.ready()
                if run.finished:
                    run.finish()
                    return
                with cond:
                    if not flag[0]:
                        cond.wait(1.0)
                    flag[0] = False
                if run.stalled():
                    raise FunctionTimeoutError(f"{fn.label}.remote_gen(): nothing for {run.target.wait_s:g}s")
        finally:
            client._loop.call_soon_threadsafe(client._pending.pop, run.call_id, None)

    async def aio(self, *args: P.args, **kwargs: P.kwargs) -> AsyncIterator[Any]:
        """The async form: ``async for x in f.remote_gen.aio(...)``.

        Example::

            async for token in generate.remote_gen.aio("hello"):
                print(token, end="")
        """
        fn = self._fn
        client = get_client()
        loop = asyncio.get_running_loop()
        event = asyncio.Event()

        def wake() -> None:
            loop.call_soon_threadsafe(event.set)

        payload = cloudpickle.dumps((args, kwargs))
        run = await client.run_async(_start, client, fn, payload, lambda t: GenRun(client, t, fn.label, wake))
        try:
            while True:
                for value in run.ready():
                    yield value
                if run.finished:
                    run.finish()
                    return
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(event.wait(), 1.0)
                event.clear()
                if run.stalled():
                    raise FunctionTimeoutError(f"{fn.label}.remote_gen(): nothing for {run.target.wait_s:g}s")
        finally:
            client._loop.call_soon_threadsafe(client._pending.pop, run.call_id, None)

"""``f.map()`` / ``f.starmap()``: many inputs, pipelined in batches, results in input order.

Inputs are pickled on the caller's thread and published in :class:`InvocationBatch` messages of consecutive
inputs, with at most ``WINDOW`` batches outstanding. The batch size adapts to the function (like TCP's slow
start): it starts at one input, doubles with every answered batch and settles where a batch holds about
``BATCH_TARGET_S`` of work, so tiny functions cost one message per hundreds of inputs while slow ones still
spread one input per replica slot. Every batch is acknowledged by JetStream before it counts as sent (a refused
batch fails the map). A batch that runs twice (its replica died before acking) answers twice: only the first
result of each input index is kept, so every input yields exactly once.
"""

from __future__ import annotations

import asyncio
import contextlib
import pickle
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any, Final, Protocol

import cloudpickle
import msgspec
from duanflow_proto import codec
from duanflow_proto.messages.invocation import CODEC_CLOUDPICKLE, InvocationBatch, Result, ResultBatch

from duanflow._client import (
    _NO_REF,
    PYTHON,
    Client,
    Target,
    decode_result,
    ensure_blocking_allowed,
    get_client,
    unwrap_result,
)
from duanflow._errors import FunctionTimeoutError, InvalidInputError
from duanflow._payload import INLINE_MAX
from duanflow._payload import fetch as fetch_payload
from duanflow._payload import store as store_payload

if TYPE_CHECKING:
    from duanflow._function import Function

WINDOW: Final = 64
"""Batches outstanding at once."""
MAX_BATCH: Final = 2048
"""Inputs per batch at most."""
MAX_BATCH_BYTES: Final = 256 * 1024
"""Pickled inputs per batch at most (a single larger input travels alone)."""
BATCH_TARGET_S: Final = 0.004
"""Work per batch the size aims at."""
_PLAIN: Final = frozenset({int, float, str, bytes, bool, type(None)})
_REF_FIELD: Final = _NO_REF[:-1]
"""How an encoded Result spells its ``payload_ref`` field: a result batch where this count differs from the
count of empty ones (``_NO_REF``) has a result stored in S3."""


def pickle_input(args: tuple[Any, ...], kwargs: dict[str, Any]) -> bytes:
    """One input's ``(args, kwargs)``; plain values skip cloudpickle's slower pickler (same wire format)."""
    if not kwargs and all(type(a) in _PLAIN for a in args):
        return pickle.dumps((args, kwargs), protocol=5)
    data: bytes = cloudpickle.dumps((args, kwargs))
    return data


class MapRun:
    """The state of one map, shared by the caller's thread (inputs, results) and the client's loop (messages)."""

    def __init__(
        self,
        client: Client,
        target: Target,
        label: str,
        wake: Callable[[], None],
    ) -> None:
        self.client = client
        self.target = target
        self.label = label
        self.call_id = client.new_call_id()
        self._wake = wake
        self._lock = threading.Lock()
        self._inbox: list[bytes] = []
        self._error: BaseException | None = None
        self.outstanding: dict[int, int] = {}
        """First index → size of each batch sent and not fully answered."""
        self.results: dict[int, Result] = {}
        self.done_count = 0
        self.batch_size = 1
        self.last_progress = time.monotonic()
        self._seen: set[int] = set()
        self._encoder = msgspec.msgpack.Encoder()
        self._sent: dict[int, bytes] = {}
        """Bodies of batches not fully answered (loop thread only), to send again after a reconnect."""
        self._attempt = 0

    # -- client loop side ----------------------------------------------------------------------------------

    def on_data(self, data: bytes) -> None:
        """A ResultBatch (or a stray Result) arrived (read loop): queue it for the caller.

        Results stored in S3 (``payload_ref``) are fetched first, on the loop, and queued with their values.
        """
        if data.count(_REF_FIELD) != data.count(_NO_REF):
            self.client._spawn_task(self._fetch_refs(data))
            return
        with self._lock:
            self._inbox.append(data)
        self._wake()

    async def _fetch_refs(self, data: bytes) -> None:
        try:
            msg = codec.decode(data, ResultBatch | Result)  # type: ignore[arg-type]
            if isinstance(msg, ResultBatch):
                results = [
                    msgspec.structs.replace(
                        r, value=await fetch_payload(self.client._nc, r.payload_ref), payload_ref=None
                    )
                    if r.payload_ref
                    else r
                    for r in msg.results
                ]
                data = codec.encode(msgspec.structs.replace(msg, results=results))
        except BaseException as exc:
            self.on_error(exc)
            return
        with self._lock:
            self._inbox.append(data)
        self._wake()

    def on_error(self, exc: BaseException) -> None:
        """A batch could not be published."""
        with self._lock:
            if self._error is None:
                self._error = exc
        self._wake()

    async def _send(self, body: bytes, first: int) -> None:
        self._attempt += 1
        try:
            await self.client.send(self.target, body, self.call_id, f"{self.call_id}-{first:x}-{self._attempt:x}")
        except BaseException as exc:
            self.on_error(exc)

    def _submit(self, body: bytes, first: int) -> None:
        self._sent[first] = body
        self.client._spawn_task(self._send(body, first))

    def _answered(self, first: int) -> None:
        self._sent.pop(first, None)

    def resend(self, token: str) -> None:
        """A batch's PubAck never came (the server restarted?): publish it again (loop thread)."""
        first = int(token.rsplit("-", 2)[1], 16)
        body = self._sent.get(first)
        if body is not None:
            self.client._spawn_task(self._send(body, first))

    def resend_all(self) -> None:
        """After a reconnect: every batch not fully answered goes out again (loop thread)."""
        for first, body in list(self._sent.items()):
            self.client._spawn_task(self._send(body, first))

    # -- caller side ---------------------------------------------------------------------------------------

    def start(self) -> None:
        """Register for results (before the first batch goes out)."""
        self.client._loop.call_soon_threadsafe(self.client._pending.__setitem__, self.call_id, self)

    def close(self) -> None:
        """Stop listening (the map ended, failed or was abandoned)."""
        self.client._loop.call_soon_threadsafe(self.client._pending.pop, self.call_id, None)

    def send_batch(self, first: int, inputs: list[bytes]) -> None:
        """Publish inputs ``first ..`` as one batch (inputs over ``INLINE_MAX`` go to S3 first, on the loop)."""
        batch = InvocationBatch(
            call_id=self.call_id,
            function=self.label,
            first_index=first,
            inputs=inputs,
            deadline_ms=int((time.time() + self.target.wait_s) * 1000),
            python=PYTHON,
        )
        self.outstanding[first] = len(inputs)
        if any(len(data) > INLINE_MAX for data in inputs):
            self.client._loop.call_soon_threadsafe(self.client._spawn_task, self._send_large(batch))
            return
        self.client._loop.call_soon_threadsafe(self._submit, self._encoder.encode(batch), first)

    async def _send_large(self, batch: InvocationBatch) -> None:
        """Store the batch's large inputs in S3, then publish it with their refs (loop thread)."""
        try:
            refs: dict[int, str] = {}
            inputs = list(batch.inputs)
            for offset, data in enumerate(inputs):
                if len(data) > INLINE_MAX:
                    refs[offset] = await store_payload(self.client._nc, data)
                    inputs[offset] = b""
            body = self._encoder.encode(msgspec.structs.replace(batch, inputs=inputs, input_refs=refs))
        except BaseException as exc:
            self.on_error(exc)
            return
        self._submit(body, batch.first_index)

    def absorb(self) -> None:
        """Take in what arrived: keep the first result of each index, adapt the batch size."""
        with self._lock:
            arrived, self._inbox = self._inbox, []
            error = self._error
        if error is not None:
            raise error
        for data in arrived:
            msg = codec.decode(data, ResultBatch | Result)  # type: ignore[arg-type]
            if isinstance(msg, Result):
                # A reply that is not a batch's: garbage the replica could not even decode. Fail the map.
                decode_result(data, self.label)
                continue
            work_us = 0
            fresh = 0
            for offset, result in enumerate(msg.results):
                index = msg.first_index + offset
                if index in self._seen:
                    continue
                self._seen.add(index)
                self.results[index] = result
                work_us += result.duration_us
                fresh += 1
            if not fresh:
                continue
            self.done_count += fresh
            self.last_progress = time.monotonic()
            size = self.outstanding.get(msg.first_index)
            if size is not None and len(msg.results) >= size:
                del self.outstanding[msg.first_index]
                self.client._loop.call_soon_threadsafe(self._answered, msg.first_index)
            else:
                self._settle_partial(msg.first_index)
            per_input = max(work_us / fresh, 1.0) / 1e6
            ideal = max(1, int(BATCH_TARGET_S / per_input))
            self.batch_size = max(1, min(MAX_BATCH, self.batch_size * 2, ideal))

    def _settle_partial(self, first: int) -> None:
        """After a split answer: drop every batch whose inputs have all been answered."""
        for start, size in list(self.outstanding.items()):
            if start <= first < start + size and all(i in self._seen for i in range(start, start + size)):
                del self.outstanding[start]
                self.client._loop.call_soon_threadsafe(self._answered, start)

    def stalled(self) -> bool:
        """True when nothing has been answered for longer than one input may take."""
        return time.monotonic() - self.last_progress > self.target.wait_s


def _batches(run: MapRun, inputs: Iterator[bytes], start: int) -> tuple[int, bool]:
    """Send batches while the window allows; return the next index and whether the inputs are exhausted."""
    index = start
    while len(run.outstanding) < WINDOW:
        batch: list[bytes] = []
        size = 0
        for data in inputs:
            batch.append(data)
            size += len(data)
            if len(batch) >= run.batch_size or size >= MAX_BATCH_BYTES:
                break
        if not batch:
            return index, True
        run.send_batch(index, batch)
        index += len(batch)
    return index, False


def _outcome(run: MapRun, index: int, return_exceptions: bool) -> Any:
    result = run.results.pop(index)
    if result.ok and not result.simulated_gpu and not result.payload_ref and result.codec == CODEC_CLOUDPICKLE:
        return pickle.loads(result.value)  # noqa: S301 - results of the caller's own function, as cloudpickle would
    if return_exceptions:
        try:
            return unwrap_result(result, run.label, run.target.gpu_label)
        except Exception as exc:
            return exc
    return unwrap_result(result, run.label, run.target.gpu_label)


class _Cursor:
    """Where one map stands: inputs published, results handed out; the same for the sync and async bodies."""

    def __init__(self, run: MapRun, inputs: Iterator[bytes], order_outputs: bool, return_exceptions: bool) -> None:
        self.run, self.inputs = run, inputs
        self.order_outputs, self.return_exceptions = order_outputs, return_exceptions
        self.next_index, self.exhausted, self.next_yield = 0, False, 0

    @property
    def finished(self) -> bool:
        """Every input was published and every result handed out."""
        return self.exhausted and self.next_yield >= self.next_index

    def step(self) -> Iterator[Any]:
        """Publish what the window allows, then yield the results that may go out now (lazily, so a raised
        remote error comes after the results before it)."""
        run = self.run
        if not self.exhausted:
            self.next_index, self.exhausted = _batches(run, self.inputs, self.next_index)
        run.absorb()
        if self.order_outputs:
            while self.next_yield in run.results:
                yield _outcome(run, self.next_yield, self.return_exceptions)
                self.next_yield += 1
        else:
            for index in list(run.results):
                yield _outcome(run, index, self.return_exceptions)
                self.next_yield += 1

    def check_stalled(self, label: str, wait_s: float) -> None:
        """Raise when no result came for the function's whole wait."""
        if self.run.stalled():
            raise FunctionTimeoutError(
                f"{label}.map(): no result for {wait_s:g}s ({self.run.done_count} of {self.next_index} done)"
            )


class MapProgress(Protocol):
    """What a progress display gets from a running map (see :func:`show_progress`)."""

    def update(self, done: int, submitted: int, exhausted: bool) -> None:
        """``done`` results of ``submitted`` inputs sent so far; ``exhausted``: every input is sent."""

    def close(self) -> None:
        """The map ended (or failed)."""


_progress_factory: Callable[[str], MapProgress] | None = None
PROGRESS_EVERY_S: Final = 0.1
"""How often a running map reports its progress at most."""


@contextlib.contextmanager
def show_progress(factory: Callable[[str], MapProgress]) -> Iterator[None]:
    """Give every map started inside the block a progress display: ``factory(label)`` (``duanflow run``)."""
    global _progress_factory
    previous, _progress_factory = _progress_factory, factory
    try:
        yield
    finally:
        _progress_factory = previous


class _Reporter:
    """Feeds a map's progress display at most every ``PROGRESS_EVERY_S`` (and once at the end)."""

    __slots__ = ("_next", "_sink")

    def __init__(self, label: str) -> None:
        factory = _progress_factory
        self._sink = factory(label) if factory is not None else None
        self._next = 0.0

    def update(self, cursor: _Cursor, *, final: bool = False) -> None:
        if self._sink is None:
            return
        now = time.monotonic()
        if final or now >= self._next:
            self._next = now + PROGRESS_EVERY_S
            self._sink.update(cursor.next_yield, cursor.next_index, cursor.exhausted)

    def close(self, cursor: _Cursor | None) -> None:
        if self._sink is not None:
            if cursor is not None:
                self.update(cursor, final=True)
            self._sink.close()


def map_sync(
    fn: Function[..., Any], inputs: Iterator[bytes], order_outputs: bool, return_exceptions: bool
) -> Iterator[Any]:
    """The body of ``f.map(...)`` in a plain thread."""
    client = get_client()
    app, name, env = fn._target(client)
    target = client.run(client.resolve, app, name, env, fn._spec)
    cond = threading.Condition()
    pending = [False]

    def wake() -> None:
        with cond:
            pending[0] = True
            cond.notify()

    run = MapRun(client, target, fn.label, wake)
    run.start()
    reporter = _Reporter(fn.label)
    cursor = None
    try:
        cursor = _Cursor(run, inputs, order_outputs, return_exceptions)
        while True:
            yield from cursor.step()
            reporter.update(cursor)
            if cursor.finished:
                return
            with cond:
                if not pending[0]:
                    cond.wait(1.0)
                pending[0] = False
            cursor.check_stalled(fn.label, target.wait_s)
    finally:
        run.close()
        reporter.close(cursor)


async def map_async(
    fn: Function[..., Any], inputs: Iterator[bytes], order_outputs: bool, return_exceptions: bool
) -> AsyncIterator[Any]:
    """The body of ``f.map.aio(...)`` in any event loop."""
    client = get_client()
    app, name, env = fn._target(client)
    target = await client.run_async(client.resolve, app, name, env, fn._spec)
    loop = asyncio.get_running_loop()
    event = asyncio.Event()

    def wake() -> None:
        loop.call_soon_threadsafe(event.set)

    run = MapRun(client, target, fn.label, wake)
    run.start()
    reporter = _Reporter(fn.label)
    cursor = None
    try:
        cursor = _Cursor(run, inputs, order_outputs, return_exceptions)
        while True:
            for outcome in cursor.step():
                yield outcome
            reporter.update(cursor)
            if cursor.finished:
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(event.wait(), 1.0)
            event.clear()
            cursor.check_stalled(fn.label, target.wait_s)
    finally:
        run.close()
        reporter.close(cursor)


def pickled_inputs(
    iterables: tuple[Iterable[Any], ...], kwargs: dict[str, Any] | None, star: bool, label: str
) -> Iterator[bytes]:
    """Each input's pickled ``(args, kwargs)``: ``zip(*iterables)`` for map, one tuple per item for starmap."""
    kw = dict(kwargs or {})
    if star:
        if len(iterables) != 1:
            raise InvalidInputError(f"{label}.starmap() takes one iterable of argument tuples")
        for item in iterables[0]:
            if not isinstance(item, (tuple, list)):
                raise InvalidInputError(f"{label}.starmap() takes tuples of arguments, got {type(item).__name__}")
            yield pickle_input(tuple(item), kw)
        return
    if not iterables:
        raise InvalidInputError(f"{label}.map() takes at least one iterable")
    for args in zip(*iterables, strict=False):
        yield pickle_input(args, kw)


class MapMethod:
    """``f.map(...)`` and ``await``-less ``async for x in f.map.aio(...)``; ``star`` for ``f.starmap``."""

    __slots__ = ("_fn", "_star")

    def __init__(self, fn: Function[..., Any], *, star: bool = False) -> None:
        self._fn = fn
        self._star = star

    def __call__(
        self,
        *iterables: Iterable[Any],
        kwargs: dict[str, Any] | None = None,
        order_outputs: bool = True,
        return_exceptions: bool = False,
    ) -> Iterator[Any]:
        """Run the function over the inputs on replicas; yield results (in input order unless told otherwise).

        Example::

            for label in classify_ticket.map(["超时了", "账单错误"]):
                print(label)
        """
        what = "starmap" if self._star else "map"
        ensure_blocking_allowed(f"{self._fn.label}.{what}()", f"`async for x in {self._fn.label}.{what}.aio(...)`")
        inputs = pickled_inputs(iterables, kwargs, self._star, self._fn.label)
        return map_sync(self._fn, inputs, order_outputs, return_exceptions)

    def aio(
        self,
        *iterables: Iterable[Any],
        kwargs: dict[str, Any] | None = None,
        order_outputs: bool = True,
        return_exceptions: bool = False,
    ) -> AsyncIterator[Any]:
        """The async form: ``async for result in f.map.aio(inputs): ...``.

        Example::

            async for label in classify_ticket.map.aio(["超时了", "账单错误"]):
                print(label)
        """
        inputs = pickled_inputs(iterables, kwargs, self._star, self._fn.label)
        return map_async(self._fn, inputs, order_outputs, return_exceptions)

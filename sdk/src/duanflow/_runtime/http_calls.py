"""The replica's HTTP path: calls the gateway sends (codec ``json``) to ``@app.endpoint`` functions.

The function gets a :class:`~duanflow.Request` (or the body's fields as keyword arguments) and its return value is
encoded for the gateway: dict/list → JSON, str → text, bytes → binary, :class:`~duanflow.Response` → its status,
headers and body, a generator → a stream of chunk messages ending with a ``final`` one. While a call runs, the
replica sends heartbeats every ``HEARTBEAT_S`` so the gateway can tell a crashed replica (502) from a slow one.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import TYPE_CHECKING, Any, Final

import msgspec
from duanflow_proto.errors import DeserializationError, DuanFlowError, InvalidInputError
from duanflow_proto.messages.common import ErrorReply
from duanflow_proto.messages.invocation import CODEC_BYTES, CODEC_JSON, HEARTBEAT_S, Invocation, Result
from nats.aio.msg import Msg

from duanflow._endpoint import takes_request
from duanflow._request import Request
from duanflow._response import Response

if TYPE_CHECKING:
    from duanflow._runtime.worker import Worker

log = logging.getLogger("duanflow.runtime.http")

MEDIA_JSON: Final = "application/json"
MEDIA_TEXT: Final = "text/plain; charset=utf-8"
MEDIA_BYTES: Final = "application/octet-stream"
_DONE: Final = object()


class HttpCall:
    """One HTTP call on this replica: runs the function, streams or answers, heartbeats meanwhile."""

    def __init__(self, worker: Worker, inv: Invocation, reply: str, started: float) -> None:
        self.worker = worker
        self.inv = inv
        self.reply = reply
        self.started = started
        self.deadline = started + worker.config.timeout_s
        self._seq = 0

    def _next_seq(self) -> int:
        seq = self._seq
        self._seq += 1
        return seq

    def _result(self, **fields: Any) -> Result:
        return Result(
            call_id=self.inv.call_id,
            replica_id=self.worker.config.replica_id,
            simulated_gpu=self.worker.simulated,
            duration_us=int((time.monotonic() - self.started) * 1e6),
            seq=self._next_seq(),
            **fields,
        )

    async def _send(self, result: Result) -> None:
        if self.reply:
            await self.worker._answer(self.reply, result)

    async def _fail(self, error: ErrorReply, *, stream: bool = False) -> None:
        await self._send(self._result(ok=False, error=error, stream=stream))

    async def _heartbeats(self) -> None:
        while True:
            await self._send(self._result(ok=True, final=False, heartbeat=True, codec=CODEC_BYTES))
            await asyncio.sleep(HEARTBEAT_S)

    async def run(self) -> None:
        """Answer the call (every outcome, errors included, reaches the caller)."""
        await self.beating(self._run())

    async def beating(self, work: Awaitable[None]) -> None:
        """Await ``work``, sending heartbeats once it outlives one interval."""
        # The heartbeat task starts only once the call outlives one interval: fast calls create no task at all.
        beats: list[asyncio.Task[None]] = []

        def start_beating() -> None:
            beats.append(asyncio.create_task(self._heartbeats(), name=f"heartbeat-{self.inv.call_id}"))

        timer = asyncio.get_running_loop().call_later(HEARTBEAT_S, start_beating)
        try:
            await work
        finally:
            timer.cancel()
            for task in beats:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    async def _run(self) -> None:
        try:
            value = await self._call(*self._arguments())
        except Exception as exc:
            await self._fail(self._failure(exc))
            return
        answer = self._answer_for(value)
        if isinstance(answer, Result):
            await self._send(answer)
        else:
            await self._stream(*answer)

    def run_now(self) -> Awaitable[None] | None:
        """Run the call on this thread, now, and answer it (the handler is sync and fast: see
        ``Worker._serve_now``). Returns the rest of a streamed answer (a generator's chunks) to await, else None."""
        worker = self.worker
        try:
            args, kwargs = self._arguments()
            on_stuck = worker._stuck_reporter(self.inv, self.reply)
            value = worker.call_inline(self.inv.method, worker.target.raw_f, args, kwargs, self._remaining(), on_stuck)
        except Exception as exc:
            self._send_now(self._result(ok=False, error=self._failure(exc)))
            return None
        answer = self._answer_for(value)
        if isinstance(answer, Result):
            self._send_now(answer)
            return None
        return self.beating(self._stream(*answer))

    def _send_now(self, result: Result) -> None:
        if self.reply:
            self.worker.answer_now(self.reply, result)

    def _failure(self, exc: Exception) -> ErrorReply:
        """The error reply for what the call raised (a DuanFlow error, e.g. bad input, or what a function call's
        would be: a timeout, or the user's own exception)."""
        if isinstance(exc, DuanFlowError):
            return exc.to_reply()
        return self.worker._failure(self.inv, exc)

    def _answer_for(self, value: Any) -> Result | tuple[Any, int, dict[str, str], str]:
        """The Result answering ``value``; for a generator (or a Response whose body is one), what to stream."""
        status, headers, media = 0, {}, ""
        if isinstance(value, Response):
            status, headers, media = value.status, value.headers, value.media_type or ""
            value = value.body
        if inspect.isgenerator(value) or inspect.isasyncgen(value):
            return value, status, headers, media
        try:
            data, codec, kind_media = encode_value(value)
        except DuanFlowError as exc:
            return self._result(ok=False, error=exc.to_reply())
        return self._result(
            ok=True, value=data, codec=codec, status=status, headers=headers, media_type=media or kind_media
        )

    def _arguments(self) -> tuple[tuple[Any, ...], dict[str, Any]]:
        try:
            payload = msgspec.json.decode(self.inv.args) if self.inv.args else {}
        except msgspec.DecodeError as exc:
            raise InvalidInputError(f"call {self.inv.call_id}: the gateway's arguments are not JSON: {exc}") from None
        if not isinstance(payload, dict):
            raise InvalidInputError(f"call {self.inv.call_id}: the gateway's arguments must be a JSON object")
        if self.worker.takes_request:
            fields = payload.get("kwargs")
            return request_arguments(
                self.worker.target.raw_f,
                self.worker.config.function,
                Request.from_gateway(payload),
                fields if isinstance(fields, dict) else {},
            )
        args, kwargs = payload.get("args", []), payload.get("kwargs", {})
        if not isinstance(args, list) or not isinstance(kwargs, dict):
            raise InvalidInputError(f"call {self.inv.call_id}: arguments must be (args, kwargs)")
        check_fits(self.worker.target.raw_f, self.worker.config.function, args, kwargs)
        return tuple(args), kwargs

    def _remaining(self) -> float:
        return max(0.0, self.deadline - time.monotonic())

    async def _call(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        worker = self.worker
        fn = worker.target.raw_f
        if worker.is_async:
            async with asyncio.timeout(self._remaining()):  # no task per call, as wait_for would make
                return await fn(*args, **kwargs)
        # A fast sync handler runs on the loop thread, as fast sync functions do; but not while another input here
        # has run long enough to heartbeat: blocking the loop would silence it, and the gateway would take a
        # replica that goes quiet mid-request for crashed (502).
        return await worker.call_sync(
            self.inv.method,
            fn,
            args,
            kwargs,
            self._remaining(),
            worker._stuck_reporter(self.inv, self.reply),
            inline_ok=worker.oldest_running_s() < HEARTBEAT_S,
        )

    async def _in_thread(self, work: Callable[[], Any]) -> Any:
        loop = asyncio.get_running_loop()
        try:
            return await asyncio.wait_for(loop.run_in_executor(self.worker._executor, work), self._remaining())
        except TimeoutError:
            self.worker._replace_executor()
            raise

    async def _stream(self, gen: Any, status: int, headers: dict[str, str], media: str) -> None:
        first = True
        try:
            async for chunk in self._chunks(gen):
                data, codec, _ = encode_value(chunk)
                fields: dict[str, Any] = {"status": status, "headers": headers, "media_type": media} if first else {}
                first = False
                await self._send(self._result(ok=True, final=False, stream=True, value=data, codec=codec, **fields))
        except TimeoutError:
            await self._fail(self._failure(TimeoutError()), stream=True)
            return
        except DuanFlowError as exc:
            await self._fail(exc.to_reply(), stream=True)
            return
        except Exception as exc:
            from duanflow._runtime.worker import remote_error

            await self._fail(remote_error(exc), stream=True)
            return
        fields = {"status": status, "headers": headers, "media_type": media} if first else {}
        await self._send(self._result(ok=True, final=True, stream=True, codec=CODEC_BYTES, **fields))

    async def _chunks(self, gen: Any) -> AsyncIterator[Any]:
        if inspect.isasyncgen(gen):
            while True:
                try:
                    async with asyncio.timeout(self._remaining()):
                        chunk = await _anext(gen)
                except StopAsyncIteration:
                    return
                yield chunk
        else:
            sync: Iterator[Any] = gen
            while True:
                chunk = await self._in_thread(lambda: next(sync, _DONE))
                if chunk is _DONE:
                    return
                yield chunk


def request_arguments(
    f: Callable[..., Any], name: str, request: Request, fields: dict[str, Any]
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The request for the parameter named ``request`` (or typed ``df.Request``), and for every other parameter the
    path parameter, body field or query value of its name: ``def get(request, item_id)`` works.

    >>> def get(request, item_id, q=None): ...
    >>> request_arguments(get, "get", Request(), {"item_id": "7", "other": 1})[1]["item_id"]
    '7'
    """
    sig = _signature(f)
    if sig is None:
        return (request,), {}
    params = sig.parameters
    kwargs: dict[str, Any] = {}
    args: tuple[Any, ...] = ()
    for p in params.values():
        if p.name == "request" or p.annotation in (Request, "Request", "df.Request"):
            if p.kind is inspect.Parameter.POSITIONAL_ONLY:
                args = (request,)
            else:
                kwargs[p.name] = request
        elif p.name in fields and p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD):
            kwargs[p.name] = fields[p.name]
    check_fits(f, name, list(args), kwargs)
    return args, kwargs


def check_fits(f: Callable[..., Any], name: str, args: list[Any], kwargs: dict[str, Any]) -> None:
    """Refuse (400) a request whose body, query and path parameters do not fit the function's parameters.

    >>> def f(x, name=None): ...
    >>> check_fits(f, "f", [], {"x": "1"})
    >>> check_fits(f, "f", [], {"other": "1"})
    Traceback (most recent call last):
    duanflow_proto.errors.InvalidInputError: the request does not fit f's parameters: missing a required argument: 'x'
    """
    sig = _signature(f)
    if sig is None:
        return
    try:
        sig.bind(*args, **kwargs)
    except TypeError as exc:
        raise InvalidInputError(f"the request does not fit {name}'s parameters: {exc}") from None


@functools.lru_cache(maxsize=256)
def _signature(f: Callable[..., Any]) -> inspect.Signature | None:
    """``f``'s signature, computed once per function (not per call), or None when it has none."""
    try:
        return inspect.signature(f)
    except (TypeError, ValueError):
        return None


def _anext(gen: Any) -> Awaitable[Any]:
    return gen.__anext__()  # type: ignore[no-any-return]


def encode_value(value: Any) -> tuple[bytes, str, str]:
    """``(data, codec, media type)`` of one returned value or streamed chunk.

    >>> encode_value({"a": 1})
    (b'{"a":1}', 'json', 'application/json')
    >>> encode_value("hi")[1:]
    ('bytes', 'text/plain; charset=utf-8')
    """
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value), CODEC_BYTES, MEDIA_BYTES
    if isinstance(value, str):
        return value.encode(), CODEC_BYTES, MEDIA_TEXT
    try:
        return msgspec.json.encode(value), CODEC_JSON, MEDIA_JSON
    except (TypeError, msgspec.EncodeError) as exc:
        raise DeserializationError(
            f"an endpoint returned {type(value).__name__}, which is not JSON, text, bytes, df.Response "
            f"or a generator: {exc}"
        ) from None


async def handle_http(worker: Worker, msg: Msg, inv: Invocation, reply: str, started: float) -> None:
    """Run one ``json``-codec (HTTP) invocation: answer the caller, then ack (no retries: the caller is waiting).

    The ack also asks for the next input when a slot is free (``+NXT``: one message to the server, not two).
    """
    await HttpCall(worker, inv, reply, started).run()
    await worker._ack(msg)


def is_http_target(f: Callable[..., Any]) -> bool:
    """Whether ``f`` takes the request object (computed once per replica)."""
    return takes_request(f)

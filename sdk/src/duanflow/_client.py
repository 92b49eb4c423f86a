"""The SDK's connection to DuanFlow: an async core on one NATS connection per process, with a sync facade.

The connection lives on a private event loop in a background thread, so ``f.remote(...)`` works in plain
scripts and ``await f.remote.aio(...)`` works from any event loop. Results come back on one inbox
subscription (``_INBOX.<client>.*``) and are matched to waiting calls by the subject's last token.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import itertools
import os
import secrets
import sys
import threading
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Final, TypeVar
from urllib.parse import urlsplit

import cloudpickle
import msgspec
import nats
import nats.errors
import nats.js.errors
from duanflow_proto import codec, subjects
from duanflow_proto.errors import from_reply
from duanflow_proto.messages.common import ErrorReply
from duanflow_proto.messages.invocation import CODEC_CLOUDPICKLE, CODEC_JSON, HDR_CALL_ID, HDR_REPLY, Invocation, Result
from duanflow_proto.messages.release import FunctionLookup, FunctionRef, FunctionSpec
from nats.aio.msg import Msg

from duanflow import _config
from duanflow._errors import (
    DeadlineExceededError,
    DeserializationError,
    FunctionTimeoutError,
    InvalidInputError,
    NotFoundError,
    PayloadTooLargeError,
    RemoteError,
    UnavailableError,
)

T = TypeVar("T")

PYTHON: Final = f"{sys.version_info.major}.{sys.version_info.minor}"
RESULT_MARGIN_S: Final = 30.0
"""How long past the function's timeout a caller keeps waiting (the replica enforces the timeout itself)."""
PUBLISH_TIMEOUT_S: Final = 10.0
CONNECT_TIMEOUT_S: Final = 10.0
CONTROL_TIMEOUT_S: Final = 30.0
LOOKUP_TIMEOUT_S: Final = 10.0
JS_ERR_MESSAGE_TOO_LARGE: Final = 10054
"""JetStream's error code for a message over the stream's ``max_msg_size``."""

_simulated_noted: set[str] = set()


class Client:
    """One NATS connection, its results inbox and a cache of resolved functions.

    Use :func:`get_client` rather than building one: a process needs only one.
    """

    def __init__(self, profile: _config.Profile | None = None) -> None:
        self._profile = profile
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="duanflow-client", daemon=True)
        self._thread.start()
        self._nc: Any = None
        self._js: Any = None
        self._connect_lock: asyncio.Lock | None = None
        self._inbox = ""
        self._pending: dict[str, asyncio.Future[bytes]] = {}
        self._targets: dict[tuple[str, str, str], Target] = {}
        self._max_payload = 1024 * 1024
        self._id_prefix = secrets.token_hex(8)
        self._ids = itertools.count(1)
        self._closed = False

    # -- facade -------------------------------------------------------------------------------------------

    @property
    def profile(self) -> _config.Profile:
        """The profile this client connects with (loaded on first use)."""
        if self._profile is None:
            self._profile = _config.current()
        return self._profile

    @property
    def env(self) -> str:
        """The default environment of the profile."""
        return self.profile.env or "main"

    def run(self, fn: Callable[..., Coroutine[Any, Any, T]], *args: Any) -> T:
        """Run ``fn(*args)`` on the client's loop and wait for it: the sync facade (one future, no other hop).

        Raises :class:`InvalidInputError` when called inside a running event loop, where blocking would
        stall it: use the ``.aio`` form there.
        """
        ensure_blocking_allowed("this DuanFlow call", "the `.aio` form")
        future = asyncio.run_coroutine_threadsafe(fn(*args), self._loop)
        try:
            return future.result()
        except BaseException:
            future.cancel()
            raise

    async def run_async(self, fn: Callable[..., Coroutine[Any, Any, T]], *args: Any) -> T:
        """Run ``fn(*args)`` on the client's loop from any other loop."""
        if asyncio.get_running_loop() is self._loop:
            return await fn(*args)
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(fn(*args), self._loop))

    def close(self, timeout: float = 2.0) -> None:
        """Close the connection and stop the loop thread (idempotent)."""
        if self._closed:
            return
        self._closed = True
        if self._nc is not None and self._loop.is_running():
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(self._nc.close(), self._loop).result(timeout)
        self._loop.call_soon_threadsafe(self._loop.stop)
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    # -- async core ---------------------------------------------------------------------------------------

    async def connect(self) -> Any:
        """Connect (once) and subscribe to the results inbox; returns the nats-py connection."""
        if self._nc is not None:
            return self._nc
        if self._connect_lock is None:
            self._connect_lock = asyncio.Lock()
        async with self._connect_lock:
            if self._nc is not None:
                return self._nc
            profile = self.profile
            where = f"{profile.nats_url} (profile from {_config.config_path()})"
            await _check_reachable(profile.nats_url, where)
            last_error: list[BaseException] = []

            async def on_error(exc: Exception) -> None:
                last_error.append(exc)

            try:
                nc = await asyncio.wait_for(
                    nats.connect(
                        servers=[profile.nats_url],
                        user=profile.nats_user or None,
                        password=profile.nats_password or None,
                        name=f"duanflow-sdk-{os.getpid()}",
                        connect_timeout=5,
                        reconnect_time_wait=0.5,
                        max_reconnect_attempts=-1,
                        error_cb=on_error,
                    ),
                    CONNECT_TIMEOUT_S,
                )
            except (TimeoutError, OSError, nats.errors.Error) as exc:
                reason = last_error[-1] if last_error else exc
                raise UnavailableError(
                    f"cannot connect to DuanFlow at {where}: {reason or type(reason).__name__}"
                ) from None
            self._inbox = nc.new_inbox()
            self._max_payload = nc.max_payload
            await nc.subscribe(f"{self._inbox}.*", cb=self._on_result)
            self._js = nc.jetstream()
            self._nc = nc
            return nc

    async def _on_result(self, msg: Msg) -> None:
        future = self._pending.get(msg.subject[len(self._inbox) + 1 :])
        if future is not None and not future.done():
            future.set_result(msg.data)

    async def request(
        self,
        subject: str,
        message: msgspec.Struct,
        reply_type: type[T],
        timeout: float = CONTROL_TIMEOUT_S,  # noqa: ASYNC109
    ) -> T:
        """Send a control request; decode the reply as ``reply_type`` or raise the ``ErrorReply`` as its class."""
        nc = self._nc or await self.connect()
        try:
            msg = await nc.request(subject, codec.encode(message), timeout=timeout)
        except nats.errors.NoRespondersError:
            raise UnavailableError(
                f"nothing answers on {subject}: is the DuanFlow stack running? (`duanflow dev status`)"
            ) from None
        except TimeoutError:
            raise DeadlineExceededError(f"no answer on {subject} within {timeout:g}s") from None
        return decode_reply(msg.data, reply_type)

    async def lookup(self, app: str, function: str, env: str) -> FunctionRef:
        """Resolve a deployed function through the router; :class:`NotFoundError` says to deploy it."""
        try:
            return await self.request(
                subjects.API_FUNCTION_LOOKUP, FunctionLookup(app=app, function=function, env=env), FunctionRef
            )
        except NotFoundError as exc:
            raise _not_deployed(app, function, env, exc.message) from None

    async def resolve(self, app: str, function: str, env: str, local: FunctionSpec | None = None) -> Target:
        """Where invocations of ``function`` go and how long to wait for them (cached for the process).

        The router's answer wins (the active release's spec); when no router answers at all, the invocation
        subject is derived from the names and the local spec (or defaults) sets the wait.
        """
        key = (env, app, function)
        target = self._targets.get(key)
        if target is not None:
            return target
        nc = self._nc or await self.connect()
        try:
            msg = await nc.request(
                subjects.API_FUNCTION_LOOKUP,
                codec.encode(FunctionLookup(app=app, function=function, env=env)),
                timeout=LOOKUP_TIMEOUT_S,
            )
        except nats.errors.NoRespondersError:
            spec = local or FunctionSpec(name=function)
            target = Target(subjects.invocation(env, app, function), spec, app, env)
        except (TimeoutError, nats.errors.TimeoutError):
            raise UnavailableError(
                f"the router did not answer the lookup of {app}.{function} within {LOOKUP_TIMEOUT_S:g}s"
            ) from None
        else:
            try:
                ref = decode_reply(msg.data, FunctionRef)
            except NotFoundError as exc:
                raise _not_deployed(app, function, env, exc.message) from None
            target = Target(ref.subject, ref.spec, app, env)
        self._targets[key] = target
        return target

    def forget(self, app: str, env: str) -> None:
        """Drop cached functions of one app (after a deploy)."""
        for key in [k for k in self._targets if k[0] == env and k[1] == app]:
            del self._targets[key]

    async def publish(
        self, target: Target, payload: bytes, *, keep_result: bool = False
    ) -> tuple[str, asyncio.Future[bytes]]:
        """Publish one invocation with serialized ``(args, kwargs)``; return its call id and the raw Result's future."""
        if self._js is None:
            await self.connect()
        call_id = f"fc-{self._id_prefix}{next(self._ids):x}"
        body = codec.encode(
            Invocation(
                call_id=call_id,
                function=target.spec.name,
                args=payload,
                deadline_ms=int((time.time() + target.wait_s) * 1000),
                python=PYTHON,
                keep_result=keep_result,
            )
        )
        if len(body) > self._max_payload:
            raise PayloadTooLargeError(
                f"the arguments of {target.spec.name} are {len(body) / 2**20:.1f} MiB, over the "
                f"{self._max_payload / 2**20:.1f} MiB an invocation can carry"
            )
        future: asyncio.Future[bytes] = self._loop.create_future()
        self._pending[call_id] = future
        try:
            await self._js.publish(
                target.subject,
                body,
                timeout=PUBLISH_TIMEOUT_S,
                headers={HDR_REPLY: f"{self._inbox}.{call_id}", HDR_CALL_ID: call_id},
            )
        except nats.js.errors.NoStreamResponseError:
            self._pending.pop(call_id, None)
            self._targets.pop((target.env, target.app, target.spec.name), None)
            raise _not_deployed(target.app, target.spec.name, target.env, f"no stream takes {target.subject}") from None
        except nats.js.errors.APIError as exc:
            self._pending.pop(call_id, None)
            if exc.err_code == JS_ERR_MESSAGE_TOO_LARGE:
                raise PayloadTooLargeError(
                    f"the arguments of {target.spec.name} are {len(body) / 2**20:.1f} MiB, over what the invocations "
                    f"stream takes ({exc.description}): pass a storage key instead of the data"
                ) from None
            raise UnavailableError(f"the invocation of {target.spec.name} was refused: {exc.description}") from None
        except (TimeoutError, nats.errors.TimeoutError):
            self._pending.pop(call_id, None)
            raise UnavailableError(
                f"JetStream did not acknowledge the invocation of {target.spec.name} within {PUBLISH_TIMEOUT_S:g}s"
            ) from None
        except BaseException:
            self._pending.pop(call_id, None)
            raise
        return call_id, future

    async def call(
        self, app: str, function: str, env: str, local: FunctionSpec | None, payload: bytes
    ) -> tuple[Target, bytes]:
        """Invoke ``function`` and wait for its raw Result (the body of ``f.remote()``)."""
        target = self._targets.get((env, app, function)) or await self.resolve(app, function, env, local)
        call_id, future = await self.publish(target, payload)
        try:
            return target, await asyncio.wait_for(future, target.wait_s)
        except TimeoutError:
            raise FunctionTimeoutError(
                f"{app}.{function} did not answer within {target.wait_s:g}s "
                f"(its timeout is {target.spec.timeout_s:g}s)",
                details={"call_id": call_id},
            ) from None
        finally:
            self._pending.pop(call_id, None)

    async def spawn(
        self, app: str, function: str, env: str, local: FunctionSpec | None, payload: bytes
    ) -> tuple[Target, str]:
        """Invoke ``function`` without waiting; the result is kept (inbox here, results bucket for others)."""
        target = self._targets.get((env, app, function)) or await self.resolve(app, function, env, local)
        call_id, _ = await self.publish(target, payload, keep_result=True)
        return target, call_id

    async def wait_result(self, call_id: str, timeout: float) -> bytes:  # noqa: ASYNC109
        """The raw Result of a spawned call: from this client's inbox, else polled from the results bucket."""
        future = self._pending.get(call_id)
        if future is not None:
            try:
                data = await asyncio.wait_for(asyncio.shield(future), timeout)
            except TimeoutError:
                raise DeadlineExceededError(
                    f"call {call_id} has not finished within {timeout:g}s", details={"call_id": call_id}
                ) from None
            self._pending.pop(call_id, None)
            return data
        if self._js is None:
            await self.connect()
        try:
            kv = await self._js.key_value(subjects.KV_RESULTS)
        except nats.js.errors.BucketNotFoundError:
            raise UnavailableError(
                f"the results bucket {subjects.KV_RESULTS} does not exist: is the stack running?"
            ) from None
        deadline = time.monotonic() + timeout
        delay = 0.02
        while True:
            try:
                entry = await kv.get(call_id)
            except nats.js.errors.KeyNotFoundError:
                entry = None
            if entry is not None and entry.value:
                return bytes(entry.value)
            if time.monotonic() >= deadline:
                raise DeadlineExceededError(
                    f"call {call_id} has no result within {timeout:g}s", details={"call_id": call_id}
                )
            await asyncio.sleep(min(delay, max(0.0, deadline - time.monotonic())))
            delay = min(delay * 2, 0.5)


@dataclass(frozen=True, slots=True)
class Target:
    """A resolved function: the subject its invocations go to and the spec that sets how long to wait."""

    subject: str
    spec: FunctionSpec
    app: str
    env: str

    @property
    def wait_s(self) -> float:
        """How long a caller waits for one result: the timeout of every attempt, the retry delays and a margin."""
        spec = self.spec
        attempts = spec.retries + 1
        return attempts * spec.timeout_s + spec.retries * spec.retry_max_delay_s + RESULT_MARGIN_S

    @property
    def gpu_label(self) -> str:
        """How the simulated-GPU note names the GPU."""
        return self.spec.gpu[0] if len(self.spec.gpu) == 1 else "GPU"


def _not_deployed(app: str, function: str, env: str, why: str) -> NotFoundError:
    return NotFoundError(
        f"function {function!r} of app {app!r} is not deployed in env {env!r} ({why}): "
        f"deploy it first with `duanflow deploy FILE --env {env}`",
        details={"app": app, "function": function, "env": env},
    )


def ensure_blocking_allowed(call: str, instead: str) -> None:
    """Raise when a blocking call is made on a thread that runs an event loop (it would stall that loop)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return
    raise InvalidInputError(
        f"{call} blocks until the result is back, and it was called inside a running event loop, which it would "
        f"stall; in async code use {instead}",
        details={"call": call},
    )


async def _check_reachable(url: str, where: str) -> None:
    """Fail in a second, with a clear message, when nothing listens (nats-py would retry for minutes)."""
    parts = urlsplit(url if "://" in url else f"nats://{url}")
    host, port = parts.hostname or "127.0.0.1", parts.port or 4222
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 3.0)
    except (OSError, TimeoutError):
        raise UnavailableError(
            f"cannot reach DuanFlow at {where}: is the stack running? Start it with `duanflow dev up`"
        ) from None
    writer.close()
    with contextlib.suppress(Exception):
        await writer.wait_closed()


def decode_reply(data: bytes, reply_type: type[T]) -> T:
    """Decode a control reply: ``reply_type``, or an ``ErrorReply`` raised as its DuanFlow error class."""
    msg: Any = codec.decode(data, reply_type | ErrorReply)  # type: ignore[arg-type]
    if isinstance(msg, ErrorReply):
        raise from_reply(msg)
    return msg  # type: ignore[no-any-return]


def decode_result(data: bytes, function: str, gpu: str = "GPU") -> Any:
    """Turn a raw ``Result`` into the return value, or raise the remote error.

    The user's exception is re-raised as its own type when it unpickles here, with the remote traceback
    attached as a note; otherwise :class:`RemoteError` (named after the remote type) carries it. ``gpu`` names
    the GPU in the one-time note printed when the replica ran on a simulated GPU.
    """
    try:
        result = codec.decode(data, Result)
    except InvalidInputError as garbage:
        raise DeserializationError(f"the result of {function} could not be decoded: {garbage.message}") from None
    if result.simulated_gpu:
        _note_simulated(function, gpu)
    if result.ok:
        if result.payload_ref:
            raise DeserializationError(
                f"the result of {function} was stored at {result.payload_ref}; large results are not supported yet"
            )
        return _loads(result.value, result.codec, function)
    error = result.error or ErrorReply(code="internal", message=f"{function} failed without an error")
    note = (
        f"\nRemote traceback (from {function} on {result.replica_id or 'a replica'}):\n{error.traceback.rstrip()}"
        if error.traceback
        else None
    )
    if error.exc_pickle:
        exc: object = None
        with contextlib.suppress(Exception):
            exc = cloudpickle.loads(error.exc_pickle)
        if isinstance(exc, Exception):
            if note:
                exc.add_note(note)
            raise exc
    err = from_reply(error)
    if isinstance(err, RemoteError) and error.exc_type and error.exc_type not in err.message:
        err = RemoteError(f"{error.exc_type}: {err.message}", details=err.details, traceback=err.remote_traceback)
    if note:
        err.add_note(note)
    raise err


def _loads(value: bytes, value_codec: str, function: str) -> Any:
    try:
        if value_codec == CODEC_CLOUDPICKLE:
            return cloudpickle.loads(value)
        if value_codec == CODEC_JSON:
            return msgspec.json.decode(value)
    except Exception as exc:
        raise DeserializationError(
            f"the result of {function} could not be unpickled here ({type(exc).__name__}: {exc}); "
            f"the replica's Python or packages may differ from this process (Python {PYTHON})"
        ) from None
    raise DeserializationError(f"the result of {function} has an unknown codec {value_codec!r}")


def _note_simulated(function: str, gpu: str) -> None:
    if function not in _simulated_noted:
        _simulated_noted.add(function)
        print(f"note: {function} ran on a simulated {gpu} (no GPU on this machine)", file=sys.stderr)


_client: Client | None = None
_client_lock = threading.Lock()


def get_client() -> Client:
    """The process's client, created on first use."""
    client = _client
    if client is not None:
        return client
    return _make_client()


def _make_client() -> Client:
    global _client
    with _client_lock:
        if _client is None:
            _client = Client()
        return _client


def reset_client() -> None:
    """Close the process's client; the next call makes a new one (reading the profile again)."""
    global _client
    with _client_lock:
        client, _client = _client, None
    if client is not None:
        client.close()


@atexit.register
def _close_at_exit() -> None:
    with contextlib.suppress(Exception):
        reset_client()


def _forget_in_child() -> None:
    # A forked child has the parent's client but not its loop thread: start afresh on first use.
    global _client, _client_lock
    _client = None
    _client_lock = threading.Lock()


os.register_at_fork(after_in_child=_forget_in_child)

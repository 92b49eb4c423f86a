"""The SDK's connection to DuanFlow: an async core on one NATS connection per process, with a sync facade.

The connection lives on a private event loop in a background thread, so ``f.remote(...)`` works in plain
scripts and ``await f.remote.aio(...)`` works from any event loop. Results come back on one inbox
subscription (``_INBOX.<client>.*``) and are matched to waiting calls by the subject's last token. A sync
``f.remote(...)`` runs on the sync lane instead (``duanflow._lane``): a second connection the calling thread drives
itself, with no hand-off to the background thread.
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
from dataclasses import dataclass, replace
from typing import Any, Final, Protocol, TypeVar
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

from duanflow import _config, _telemetry
from duanflow._errors import (
    CallCancelledError,
    DeadlineExceededError,
    DeserializationError,
    FunctionTimeoutError,
    InvalidInputError,
    NotFoundError,
    PayloadTooLargeError,
    RemoteError,
    UnavailableError,
)
from duanflow._inbox import subscribe_direct
from duanflow._lane import CONFIRM_AFTER_S, HDR_MSG_ID, PUBLISH_TIMEOUT_S, Lane, LaneUnavailable, Refused
from duanflow._payload import INLINE_MAX
from duanflow._payload import fetch as fetch_payload
from duanflow._payload import store as store_payload

T = TypeVar("T")

PYTHON: Final = f"{sys.version_info.major}.{sys.version_info.minor}"
RESULT_MARGIN_S: Final = 30.0
"""How long past the function's timeout a caller keeps waiting (the replica enforces the timeout itself)."""
CONNECT_TIMEOUT_S: Final = 10.0
CONTROL_TIMEOUT_S: Final = 30.0
LOOKUP_TIMEOUT_S: Final = 10.0
SPAWNED_KEEP_S: Final = 300.0
"""How long a spawned call's result stays in memory for ``get()`` after it came (the results bucket keeps it a day)."""
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
        self._ack_inbox = ""
        self._pending: dict[str, asyncio.Future[bytes] | Sink] = {}
        """Calls waiting for results, by the reply subject's last token: a future, or a sink for many messages."""
        self._unacked: dict[str, tuple[str, asyncio.TimerHandle, Target]] = {}
        """Published invocations whose PubAck has not come yet: ack token → (pending key, timer, target)."""
        self._targets: dict[tuple[str, str, str], Target] = {}
        self._max_payload = 1024 * 1024
        self._id_prefix = secrets.token_hex(8)
        self._ids = itertools.count(1)
        self._closed = False
        self._tasks: set[asyncio.Task[None]] = set()
        """Publishes started for sync callers (kept referenced until done)."""
        self._in_flight: dict[str, tuple[Target, bytes, dict[str, str]]] = {}
        """Bodies of ``.remote()`` calls waiting for their result, to send again after a reconnect."""
        self._generation = 0
        self._stored: dict[str, asyncio.Future[None]] = {}
        """Spawned calls waiting for their PubAck."""
        self._lane: Lane | None = None
        """The sync fast lane, once a sync call has used it."""

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

    def use_env(self, env: str) -> None:
        """Call functions in ``env`` from now on (``duanflow run --env`` of a local entrypoint)."""
        self._profile = replace(self.profile, env=env)

    def run(self, fn: Callable[..., Coroutine[Any, Any, T]], *args: Any) -> T:
        """Run ``fn(*args)`` on the client's loop and wait for it: the sync facade (one future, no other hop).

        Raises :class:`InvalidInputError` when called inside a running event loop, where blocking would
        stall it: use the ``.aio`` form there.
        """
        ensure_blocking_allowed("this DuanFlow call", "the `.aio` form")
        if self._closed:
            raise _closed_error()
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
        if self._closed:
            raise _closed_error()
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(fn(*args), self._loop))

    def close(self, timeout: float = 2.0) -> None:
        """Close the connection and stop the loop thread (idempotent)."""
        if self._closed:
            return
        self._closed = True
        lane = self._lane
        if lane is not None and lane.lock.acquire(timeout=timeout):
            try:
                lane.close()
            finally:
                lane.lock.release()
        if self._nc is not None and self._loop.is_running():
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(self._nc.close(), self._loop).result(timeout)
        self._loop.call_soon_threadsafe(self._loop.stop)
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)
            if not self._thread.is_alive():  # stopped: its loop can go (no "unclosed event loop" warning)
                self._loop.close()

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
            refused = asyncio.Event()

            async def on_error(exc: Exception) -> None:
                last_error.append(exc)
                if self._nc is None and isinstance(exc, ConnectionResetError):
                    refused.set()  # dropped during the handshake: retrying until the timeout would not help

            try:
                nc = await _first_of(
                    nats.connect(
                        servers=[profile.nats_url],
                        user=profile.nats_user or None,
                        password=profile.nats_password or None,
                        name=f"duanflow-sdk-{os.getpid()}",
                        connect_timeout=5,
                        reconnect_time_wait=0.5,
                        max_reconnect_attempts=-1,
                        error_cb=on_error,
                        reconnected_cb=self._on_reconnected,
                    ),
                    refused,
                    CONNECT_TIMEOUT_S,
                )
            except (TimeoutError, OSError, nats.errors.Error) as exc:
                reason = last_error[-1] if last_error else exc
                hint = ""
                if isinstance(reason, ConnectionResetError) and (profile.nats_user or profile.nats_password):
                    # nats-server answers a bad login with -ERR 'Authorization Violation' and closes at once; the
                    # reset can reach us before that line does
                    hint = (
                        " (the server dropped the connection during login, as it does on an Authorization Violation:"
                        " check the token, or user and password, with `duanflow auth login`)"
                    )
                raise UnavailableError(
                    f"cannot connect to DuanFlow at {where}: {reason or type(reason).__name__}{hint}"
                ) from None
            self._inbox = nc.new_inbox()
            self._ack_inbox = nc.new_inbox()
            self._max_payload = nc.max_payload
            await subscribe_direct(nc, f"{self._inbox}.*", self._on_result)
            await subscribe_direct(nc, f"{self._ack_inbox}.*", self._on_puback)
            self._js = nc.jetstream()
            self._nc = nc
            return nc

    def _on_result(self, msg: Msg) -> None:
        # Runs inside the connection's read loop (duanflow._inbox): no awaiting here.
        key = msg.subject[len(self._inbox) + 1 :]
        waiter = self._pending.get(key)
        if waiter is None:
            return
        self._in_flight.pop(key, None)
        if type(waiter) is asyncio.Future:
            if not waiter.done():
                waiter.set_result(msg.data)
        else:
            if type(waiter) is _SyncWaiter or type(waiter) is _LoopWaiter:
                # One result each: forget it here, in the read loop, so the caller need not hop back onto this loop
                # to do it, and the late confirmation (CONFIRM_AFTER_S) finds nothing to publish again. (Maps and
                # generators are sinks of many messages: they forget themselves.)
                del self._pending[key]
            waiter.on_data(msg.data)  # type: ignore[union-attr]

    def _on_puback(self, msg: Msg) -> None:
        """JetStream's answer to one publish: nothing to do when stored, else fail the waiting call."""
        entry = self._unacked.pop(msg.subject[len(self._ack_inbox) + 1 :], None)
        if entry is None:
            return
        key, timer, target = entry
        timer.cancel()
        stored = self._stored.get(key)
        if stored is not None and not stored.done():
            stored.set_result(None)
        status = (msg.headers or {}).get("Status", "")
        if status == "503" or b'"error"' in msg.data:
            self._fail(key, self._refusal(target, status, msg.data))

    def _refusal(self, target: Target, status: str, data: bytes) -> Exception:
        """The error of a publish JetStream refused: no stream takes the subject (503: not deployed, and the
        cached target is dropped), or the stream's own error."""
        if status == "503":
            self._targets.pop((target.env, target.app, target.spec.name), None)
            return _not_deployed(target.app, target.spec.name, target.env, f"no stream takes {target.subject}")
        return _publish_error(target, data)

    async def _on_reconnected(self) -> None:
        """After a reconnect, results published meanwhile are lost: send every call still waiting again.

        Each goes out as a new message (a fresh ``Nats-Msg-Id``): one already run answers again, and the caller
        keeps the first answer of each call or input.
        """
        self._generation += 1
        for key, (target, body, headers) in list(self._in_flight.items()):
            if key in self._pending:
                fresh = {**headers, HDR_MSG_ID: f"{key}-r{self._generation}"}
                self._spawn_task(self._republish(target, body, key, fresh))
        for waiter in list(self._pending.values()):
            resend = getattr(waiter, "resend_all", None)
            if resend is not None:
                resend()

    def _on_puback_timeout(self, token: str) -> None:
        entry = self._unacked.pop(token, None)
        if entry is not None:
            resend = getattr(self._pending.get(entry[0]), "resend", None)
            if resend is not None:
                resend(token)  # a map's batch: publish it again rather than fail the map
                return
            self._fail(
                entry[0],
                UnavailableError(
                    f"JetStream did not acknowledge the invocation of {entry[2].spec.name} "
                    f"within {PUBLISH_TIMEOUT_S:g}s"
                ),
            )

    def _fail(self, key: str, exc: BaseException) -> None:
        waiter = self._pending.get(key)
        if waiter is None:
            return
        if type(waiter) is asyncio.Future:
            if not waiter.done():
                waiter.set_exception(exc)
        else:
            waiter.on_error(exc)  # type: ignore[union-attr]

    async def send(self, target: Target, body: bytes, key: str, ack_token: str, *, confirm: bool = True) -> None:
        """Publish one invocation body without waiting for its PubAck (it is checked when it comes).

        Results go to ``<inbox>.<key>``; the PubAck to ``<ack inbox>.<ack_token>``. A refused publish (no stream,
        too large) or a PubAck that never comes fails the waiter of ``key``.

        With ``confirm=False`` (calls whose caller waits for the result anyway) no PubAck is asked for: the
        message carries ``Nats-Msg-Id`` = ``key``, and only when no result came within ``CONFIRM_AFTER_S`` is the
        same message published again asking for one. JetStream's de-duplication stores it at most once, and the
        PubAck then says whether it was stored (or why not): failures surface within a second, while a fast call
        costs one message fewer each way.
        """
        if len(body) > self._max_payload:
            raise PayloadTooLargeError(
                f"the arguments of {target.spec.name} are {len(body) / 2**20:.1f} MiB, over the "
                f"{self._max_payload / 2**20:.1f} MiB an invocation can carry"
            )
        if not confirm:
            headers = {HDR_REPLY: f"{self._inbox}.{key}", HDR_CALL_ID: key, HDR_MSG_ID: key}
            _telemetry.inject(headers, key)
            self._in_flight[key] = (target, body, headers)
            await self._nc.publish(target.subject, body, headers=headers)
            self._loop.call_later(CONFIRM_AFTER_S, self._confirm_late, target, body, key, headers)
            return
        timer = self._loop.call_later(PUBLISH_TIMEOUT_S, self._on_puback_timeout, ack_token)
        self._unacked[ack_token] = (key, timer, target)
        headers = {HDR_REPLY: f"{self._inbox}.{key}", HDR_CALL_ID: key}
        _telemetry.inject(headers, key)
        try:
            await self._nc.publish(target.subject, body, reply=f"{self._ack_inbox}.{ack_token}", headers=headers)
        except BaseException:
            timer.cancel()
            self._unacked.pop(ack_token, None)
            raise

    def _confirm_late(self, target: Target, body: bytes, key: str, headers: dict[str, str]) -> None:
        """No result yet: publish the invocation again (de-duplicated by its id), this time asking for a PubAck."""
        if key not in self._pending or self._nc is None or self._nc.is_closed:
            return
        timer = self._loop.call_later(PUBLISH_TIMEOUT_S, self._on_puback_timeout, key)
        self._unacked[key] = (key, timer, target)
        task = self._loop.create_task(self._republish(target, body, key, headers))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _republish(self, target: Target, body: bytes, key: str, headers: dict[str, str]) -> None:
        try:
            await self._nc.publish(target.subject, body, reply=f"{self._ack_inbox}.{key}", headers=headers)
        except Exception as exc:
            entry = self._unacked.pop(key, None)
            if entry is not None:
                entry[1].cancel()
            self._fail(key, UnavailableError(f"could not publish the invocation of {target.spec.name}: {exc}"))

    def new_call_id(self) -> str:
        """A fresh call id (``fc-`` + this client's prefix + a counter)."""
        return f"fc-{self._id_prefix}{next(self._ids):x}"

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
        self, target: Target, payload: bytes, *, keep_result: bool = False, method: str = "", confirm: bool = True
    ) -> tuple[str, asyncio.Future[bytes]]:
        """Publish one invocation with serialized ``(args, kwargs)``; return its call id and the raw Result's future."""
        if self._js is None:
            await self.connect()
        call_id = f"fc-{self._id_prefix}{next(self._ids):x}"
        ref = None
        if len(payload) > INLINE_MAX:
            ref, payload = await store_payload(self._nc, payload), b""
        body = _encode_invocation(
            Invocation(
                call_id=call_id,
                function=target.spec.name,
                args=payload,
                payload_ref=ref,
                deadline_ms=int((time.time() + target.wait_s) * 1000),
                python=PYTHON,
                keep_result=keep_result,
                method=method,
            )
        )
        future: asyncio.Future[bytes] = self._loop.create_future()
        self._pending[call_id] = future
        try:
            await self.send(target, body, call_id, call_id, confirm=confirm)
        except BaseException:
            self._pending.pop(call_id, None)
            raise
        return call_id, future

    async def call(
        self, app: str, function: str, env: str, local: FunctionSpec | None, payload: bytes, method: str = ""
    ) -> tuple[Target, bytes]:
        """Invoke ``function`` and wait for its raw Result (the body of ``f.remote()``)."""
        target = self._targets.get((env, app, function)) or await self.resolve(app, function, env, local)
        call_id, future = await self.publish(target, payload, method=method, confirm=False)
        try:
            return target, await self.inline_result(await asyncio.wait_for(future, target.wait_s))
        except TimeoutError:
            raise _timed_out(app, function, target, call_id) from None
        finally:
            self._forget(call_id)

    def _forget(self, call_id: str) -> None:
        self._pending.pop(call_id, None)
        self._in_flight.pop(call_id, None)

    def call_sync(
        self, app: str, function: str, env: str, local: FunctionSpec | None, payload: bytes, method: str = ""
    ) -> tuple[Target, bytes]:
        """:meth:`call` for the sync facade, with one thread hand-off each way and no task or future chain.

        The invocation is encoded on the caller's thread; the loop only registers the waiter and publishes;
        the caller sleeps on a plain lock that the result's arrival (in the read loop) releases.
        """
        target = self._targets.get((env, app, function))
        if target is None or self._nc is None or self._closed or len(payload) > INLINE_MAX:
            done: tuple[Target, bytes] = self.run(
                _telemetry.within, _telemetry.current_headers(), self.call, app, function, env, local, payload, method
            )
            return done
        call_id = f"fc-{self._id_prefix}{next(self._ids):x}"
        body = _encode_invocation(
            Invocation(
                call_id=call_id,
                function=target.spec.name,
                args=payload,
                deadline_ms=int((time.time() + target.wait_s) * 1000),
                python=PYTHON,
                method=method,
            )
        )
        lane = self._sync_lane()
        if lane is not None and lane.lock.acquire(blocking=False):
            # This thread drives the lane's connection itself for the call: no hand-off to the client's thread.
            try:
                data = lane.call(target.subject, body, call_id, target.wait_s, target.spec.name)
            except LaneUnavailable:
                pass
            except TimeoutError:
                raise _timed_out(app, function, target, call_id) from None
            except Refused as exc:
                raise self._refusal(target, exc.status, exc.data) from None
            else:
                if _NO_REF not in data:
                    data = self.run(self.inline_result, data)
                return target, data
            finally:
                lane.lock.release()
        _telemetry.bind(call_id)
        waiter = _SyncWaiter()
        self._loop.call_soon_threadsafe(self._start_sync, target, body, call_id, waiter)
        try:
            if not waiter.lock.acquire(timeout=target.wait_s):
                raise _timed_out(app, function, target, call_id)
        finally:
            if waiter.data is None:
                self._loop.call_soon_threadsafe(self._forget, call_id)
        if waiter.error is not None:
            raise waiter.error
        answer: bytes = waiter.data  # type: ignore[assignment]
        if _NO_REF not in answer:
            answer = self.run(self.inline_result, answer)
        return target, answer

    def _sync_lane(self) -> Lane | None:
        """The sync fast lane (``duanflow._lane``), made on first use; None while it cannot be used."""
        lane = self._lane
        if lane is None:
            profile = self.profile
            lane = self._lane = Lane(profile.nats_url, profile.nats_user, profile.nats_password)
        return lane if lane.usable() else None

    async def inline_result(self, data: bytes) -> bytes:
        """A raw Result whose value is stored in S3 (``payload_ref``), with the value fetched back into it."""
        if _NO_REF in data:
            return data
        try:
            result = codec.decode(data, Result)
        except InvalidInputError:
            return data
        if not result.payload_ref:
            return data
        value = await fetch_payload(self._nc, result.payload_ref)
        return codec.encode(msgspec.structs.replace(result, value=value, payload_ref=None))

    async def call_async(
        self, app: str, function: str, env: str, local: FunctionSpec | None, payload: bytes, method: str = ""
    ) -> tuple[Target, bytes]:
        """:meth:`call` for ``.remote.aio()`` from another event loop: the result is handed straight to the
        caller's loop (no task or future chain on the client's loop)."""
        target = self._targets.get((env, app, function))
        caller = asyncio.get_running_loop()
        if target is None or self._nc is None or self._closed or len(payload) > INLINE_MAX or caller is self._loop:
            return await self.run_async(
                _telemetry.within, _telemetry.current_headers(), self.call, app, function, env, local, payload, method
            )
        call_id = f"fc-{self._id_prefix}{next(self._ids):x}"
        _telemetry.bind(call_id)
        body = _encode_invocation(
            Invocation(
                call_id=call_id,
                function=target.spec.name,
                args=payload,
                deadline_ms=int((time.time() + target.wait_s) * 1000),
                python=PYTHON,
                method=method,
            )
        )
        waiter = _LoopWaiter(caller)
        self._loop.call_soon_threadsafe(self._start_sync, target, body, call_id, waiter)
        try:
            data = await asyncio.wait_for(waiter.future, target.wait_s)
        except TimeoutError:
            raise _timed_out(app, function, target, call_id) from None
        finally:
            if not waiter.future.done() or waiter.future.cancelled():  # an answer already forgot it (_on_result)
                self._loop.call_soon_threadsafe(self._forget, call_id)
        if _NO_REF not in data:
            data = await self.run_async(self.inline_result, data)
        return target, data

    def _start_sync(self, target: Target, body: bytes, call_id: str, waiter: _SyncWaiter | _LoopWaiter) -> None:
        self._pending[call_id] = waiter
        self._spawn_task(self._send_sync(target, body, call_id, waiter))

    def _spawn_task(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run ``coro`` on the loop, keeping it referenced until done (it handles its own errors)."""
        task = self._loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _send_sync(self, target: Target, body: bytes, call_id: str, waiter: _SyncWaiter | _LoopWaiter) -> None:
        try:
            await self.send(target, body, call_id, call_id, confirm=False)
        except BaseException as exc:
            self._pending.pop(call_id, None)
            waiter.on_error(exc)

    async def spawn(
        self, app: str, function: str, env: str, local: FunctionSpec | None, payload: bytes, method: str = ""
    ) -> tuple[Target, str]:
        """Invoke ``function`` without waiting for it; return once JetStream has stored the invocation.

        The result is kept (this client's inbox, and the results bucket for any other process).
        """
        target = self._targets.get((env, app, function)) or await self.resolve(app, function, env, local)
        call_id, future = await self.publish(target, payload, keep_result=True, method=method)
        stored = self._loop.create_future()
        self._stored[call_id] = stored
        try:
            # The PubAck (or the refusal, which also fails the call's future) decides.
            done, _ = await asyncio.wait({stored, future}, timeout=PUBLISH_TIMEOUT_S, return_when="FIRST_COMPLETED")
        finally:
            self._stored.pop(call_id, None)
        if future in done and future.exception() is not None:
            self._pending.pop(call_id, None)
            raise future.exception()  # type: ignore[misc]
        if not done:
            self._pending.pop(call_id, None)
            raise UnavailableError(
                f"JetStream did not acknowledge the invocation of {target.spec.name} within {PUBLISH_TIMEOUT_S:g}s"
            )
        # Kept here for a quick get(); forgotten a while after it came (or could have come), so a process that
        # spawns without fetching does not grow. get() then reads the results bucket.
        self._loop.call_later(target.wait_s + SPAWNED_KEEP_S, self._forget_spawned, call_id, future)
        future.add_done_callback(lambda f: self._loop.call_later(SPAWNED_KEEP_S, self._forget_spawned, call_id, f))
        return target, call_id

    def _forget_spawned(self, call_id: str, future: asyncio.Future[bytes]) -> None:
        if self._pending.get(call_id) is future:
            del self._pending[call_id]

    async def _bucket(self, name: str) -> Any:
        if self._js is None:
            await self.connect()
        try:
            return await self._js.key_value(name)
        except nats.js.errors.BucketNotFoundError:
            raise UnavailableError(f"the bucket {name} does not exist: is the stack running?") from None

    async def cancel(self, call_id: str) -> None:
        """Cancel a spawned call: record its id in the cancels bucket, which every replica watches.

        A replica skips a cancelled input it has not started and stops one it is running (a sync function's
        thread cannot be stopped: it runs on, detached, and its result is dropped). A waiter here fails at once.
        """
        cancels = await self._bucket(subjects.KV_CANCELS)
        await cancels.put(call_id, str(int(time.time() * 1000)).encode())
        waiter = self._pending.get(call_id)
        if isinstance(waiter, asyncio.Future) and not waiter.done():
            waiter.set_exception(CallCancelledError(f"call {call_id} was cancelled", details={"call_id": call_id}))

    async def wait_result(self, call_id: str, timeout: float) -> bytes:  # noqa: ASYNC109
        """The raw Result of a spawned call: from this client's inbox, else polled from the results bucket."""
        future = self._pending.get(call_id)
        if isinstance(future, asyncio.Future):
            try:
                data = await asyncio.wait_for(asyncio.shield(future), timeout)
            except TimeoutError:
                raise DeadlineExceededError(
                    f"call {call_id} has not finished within {timeout:g}s", details={"call_id": call_id}
                ) from None
            self._pending.pop(call_id, None)
            return await self.inline_result(data)
        kv = await self._bucket(subjects.KV_RESULTS)
        cancels = await self._bucket(subjects.KV_CANCELS)
        deadline = time.monotonic() + timeout
        delay = 0.02
        while True:
            try:
                entry = await kv.get(call_id)
            except nats.js.errors.KeyNotFoundError:
                entry = None
            if entry is not None and entry.value:
                return await self.inline_result(bytes(entry.value))
            if await _has_key(cancels, call_id):
                raise CallCancelledError(f"call {call_id} was cancelled", details={"call_id": call_id})
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


class _LoopWaiter:
    """An async caller's wait for one result, on the caller's own loop."""

    __slots__ = ("future", "loop")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.future: asyncio.Future[bytes] = loop.create_future()

    def _set(self, data: bytes | None, exc: BaseException | None) -> None:
        if self.future.done():
            return
        if exc is not None:
            self.future.set_exception(exc)
        else:
            self.future.set_result(data)  # type: ignore[arg-type]

    def on_data(self, data: bytes) -> None:
        self.loop.call_soon_threadsafe(self._set, data, None)

    def on_error(self, exc: BaseException) -> None:
        self.loop.call_soon_threadsafe(self._set, None, exc)


async def _first_of(connect: Coroutine[Any, Any, Any], refused: asyncio.Event, within_s: float) -> Any:
    """The connection ``connect`` makes, unless ``refused`` is set or ``within_s`` passes first (TimeoutError)."""
    task = asyncio.ensure_future(connect)
    gave_up = asyncio.ensure_future(refused.wait())
    try:
        await asyncio.wait({task, gave_up}, timeout=within_s, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gave_up.cancel()
    if task.done():
        return task.result()
    task.cancel()
    with contextlib.suppress(BaseException):
        await task
    raise TimeoutError


class _SyncWaiter:
    """A sync caller's wait for one result: a lock the loop releases when the result (or an error) is in."""

    __slots__ = ("data", "error", "lock")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.lock.acquire()
        self.data: bytes | None = None
        self.error: BaseException | None = None

    def on_data(self, data: bytes) -> None:
        if self.data is None and self.error is None:
            self.data = data
            self.lock.release()

    def on_error(self, exc: BaseException) -> None:
        if self.data is None and self.error is None:
            self.error = exc
            self.lock.release()


class Sink(Protocol):
    """Receives every message sent to one reply subject (maps, generators)."""

    def on_data(self, data: bytes) -> None:
        """One message arrived."""

    def on_error(self, exc: BaseException) -> None:
        """The publish feeding this sink failed."""


_invocation_encoder = msgspec.msgpack.Encoder()
_NO_REF: Final = b"\xabpayload_ref\xc0"
"""How an encoded Result with ``payload_ref=None`` spells that field: a quick test before decoding."""


def _encode_invocation(inv: msgspec.Struct) -> bytes:
    return _invocation_encoder.encode(inv)


def _publish_error(target: Target, data: bytes) -> Exception:
    """The error a refused JetStream publish stands for."""
    try:
        err = msgspec.json.decode(data).get("error", {})
    except Exception:
        err = {}
    code, description = err.get("err_code"), err.get("description", "refused")
    if code == JS_ERR_MESSAGE_TOO_LARGE:
        return PayloadTooLargeError(
            f"the arguments of {target.spec.name} are over what the invocations stream takes ({description}): "
            "pass a storage key instead of the data"
        )
    return UnavailableError(f"the invocation of {target.spec.name} was refused: {description}")


def _timed_out(app: str, function: str, target: Target, call_id: str) -> FunctionTimeoutError:
    return FunctionTimeoutError(
        f"{app}.{function} did not answer within {target.wait_s:g}s (its timeout is {target.spec.timeout_s:g}s)",
        details={"call_id": call_id},
    )


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


async def _has_key(kv: Any, key: str) -> bool:
    try:
        entry = await kv.get(key)
    except nats.js.errors.KeyNotFoundError:
        return False
    return entry is not None and entry.value is not None


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
    if result.stream and not result.final:
        raise InvalidInputError(f"{function} is a generator function: iterate `{function}.remote_gen(...)` instead")
    return unwrap_result(result, function, gpu)


def unwrap_result(result: Result, function: str, gpu: str = "GPU") -> Any:
    """:func:`decode_result` for a Result already decoded (a map's results arrive many to a message)."""
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


def _closed_error() -> UnavailableError:
    return UnavailableError(
        "this DuanFlow client is closed (the process is exiting, or a new client replaced it): "
        "a call made after that cannot run"
    )


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

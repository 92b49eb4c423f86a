"""Fast sync functions run on the replica's event-loop thread, under a watchdog.

Handing a call to a worker thread and back costs two thread wake-ups, as much as a trivial function's whole
remote call. So a sync function whose recent calls all finished within ``INLINE_MAX_S`` runs inline on the loop
thread; one slower call sends it back to the thread pool (where the loop stays free for heartbeats and other
inputs). An inline call that overruns the function's timeout is interrupted by the watchdog thread, which raises
:class:`InlineTimeout` inside it (``PyThreadState_SetAsyncExc``): the input is reported as timed out and the
replica keeps serving. Code blocked inside one C call (``time.sleep``, a socket read, a GPU kernel) cannot be
interrupted that way: the watchdog then answers the caller with the timeout itself, over a connection of its
own (the loop, blocked, cannot), and the input is acked once the call returns.
"""

from __future__ import annotations

import ctypes
import json
import logging
import socket
import threading
import time
from collections.abc import Callable
from typing import Any, Final
from urllib.parse import urlsplit

log = logging.getLogger("duanflow.runtime.inline")

INLINE_MAX_S: Final = 0.002
"""Calls shorter than this may run on the loop thread."""
FAST_STREAK: Final = 3
"""Consecutive fast calls before a function runs inline."""
STUCK_GRACE_S: Final = 0.2
"""How long after the interrupt a call still running counts as blocked in C code."""


class InlineTimeout(BaseException):
    """Raised inside an inline call that ran past its timeout."""


class Gate:
    """Whether one callable's calls run inline, from how long its recent calls took."""

    __slots__ = ("inline", "streak")

    def __init__(self) -> None:
        self.inline = False
        self.streak = 0

    def record(self, seconds: float) -> None:
        """Note one call's duration."""
        if seconds < INLINE_MAX_S:
            self.streak += 1
            if self.streak >= FAST_STREAK:
                self.inline = True
        else:
            self.streak = 0
            self.inline = False


class Watchdog:
    """Interrupts an inline call on the loop thread once it runs past its deadline."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._deadline = 0.0
        self._token = 0
        self._fired = False
        self._thread_id = 0
        self._thread: threading.Thread | None = None
        self._on_stuck: Callable[[], None] | None = None
        self._reported = False

    def call(
        self,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        timeout: float,
        on_stuck: Callable[[], None] | None = None,
    ) -> Any:
        """``fn(*args, **kwargs)`` on this thread; :class:`InlineTimeout` when it overruns ``timeout``.

        ``on_stuck`` runs on the watchdog's thread when the call cannot be interrupted (blocked in C code); the
        call then ends with :class:`InlineTimeout` whenever it returns.
        """
        if self._thread is None:
            self._thread = threading.Thread(target=self._watch, name="duanflow-watchdog", daemon=True)
            self._thread.start()
        with self._lock:
            self._token += 1
            self._fired = False
            self._thread_id = threading.get_ident()
            self._deadline = time.monotonic() + timeout
            self._on_stuck = on_stuck
            self._reported = False
            if timeout < 1.0:
                # The watchdog re-checks at least every second; sooner deadlines need it awake now.
                self._cond.notify()
        try:
            try:
                value = fn(*args, **kwargs)
            finally:
                with self._lock:
                    self._deadline = 0.0
                    reported = self._reported
            if reported:
                raise InlineTimeout
            return value
        except InlineTimeout:
            raise
        finally:
            # An exception set just before the call ended surfaces here at the latest, not in the loop.
            _checkpoint()

    def _watch(self) -> None:
        with self._lock:
            while True:
                deadline = self._deadline
                if not deadline:
                    self._cond.wait(1.0)
                    continue
                left = deadline - time.monotonic()
                if left > 0:
                    self._cond.wait(min(left, 1.0))
                    continue
                if not self._fired:
                    self._fired = True
                    ctypes.pythonapi.PyThreadState_SetAsyncExc(
                        ctypes.c_ulong(self._thread_id), ctypes.py_object(InlineTimeout)
                    )
                    self._cond.wait(STUCK_GRACE_S)
                    continue
                if not self._reported and self._on_stuck is not None:
                    self._reported = True
                    try:
                        self._on_stuck()
                    except Exception as exc:
                        log.warning("could not report a blocked call's timeout: %s", exc)
                self._cond.wait(1.0)


def _checkpoint() -> None:
    for _ in range(2):
        pass


def raw_publish(url: str, user: str, password: str, messages: list[tuple[str, bytes]], timeout: float = 3.0) -> None:
    """Publish ``messages`` over a short-lived plain NATS connection (for a thread that cannot use the loop's)."""
    parts = urlsplit(url if "://" in url else f"nats://{url}")
    with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 4222), timeout=timeout) as sock:
        reader = sock.makefile("rb")
        if not reader.readline().startswith(b"INFO"):
            raise ConnectionError("not a NATS server")
        opts: dict[str, Any] = {"verbose": False, "pedantic": False, "name": "duanflow-watchdog", "lang": "python"}
        if user:
            opts.update(user=user, **{"pass": password})
        out = [b"CONNECT " + json.dumps(opts).encode() + b"\r\n"]
        for subject, data in messages:
            out.append(f"PUB {subject} {len(data)}\r\n".encode() + data + b"\r\n")
        out.append(b"PING\r\n")
        sock.sendall(b"".join(out))
        while True:
            line = reader.readline()
            if not line or line.startswith(b"PONG"):
                return
            if line.startswith(b"-ERR"):
                raise ConnectionError(line.decode(errors="replace").strip())

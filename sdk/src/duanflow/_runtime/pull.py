"""Pull requests that match the replica's free slots exactly.

Every delivered message takes one from the replica's *credit* (messages asked for, not yet received); a request
the server closes (``408`` expired, ``409``) says in ``Nats-Pending-Messages`` how many it still owed, so the
credit stays exact. It asks for more only when
``free slots > credit``, so it never holds an input it cannot start (another replica may take it), and a slot
freed by a finished input is re-offered at once, in the same flush as that input's result and ack.

Draining (SIGTERM): :meth:`Puller.drain` stops every new request, and :meth:`Puller.withdraw` removes the inbox's
interest at the server while still handling what is already on its way (until the server's PONG): the server then
delivers nothing more on the open requests (it checks interest before each delivery). Unsubscribing locally first
would let a message reach a dead inbox, where it waits for ``ack_wait``; keeping the requests open while handing
back what they bring would let a handed-back message come straight back to the same requests, again and again,
until ``max_deliver`` drops it.
"""

from __future__ import annotations

import collections
import itertools
import json
import logging
import time
from collections.abc import Callable
from typing import Any, Final

from duanflow_proto import subjects
from nats.aio.msg import Msg

from duanflow._inbox import publish_soon, subscribe_direct, withdraw

log = logging.getLogger("duanflow.runtime.pull")

PULL_EXPIRES_S: Final = 5.0
"""Lifetime of one pull request; an idle replica re-asks this often."""
STATUS: Final = "Status"
PENDING_MESSAGES: Final = "Nats-Pending-Messages"
ACK_NEXT: Final = b"+NXT "
"""JetStream's ack that also asks for more messages, answered on the ack's reply subject."""


class Puller:
    """Keeps ``free`` messages requested from one durable pull consumer; hands each to ``on_msg``."""

    def __init__(
        self,
        nc: Any,
        stream: str,
        consumer: str,
        on_msg: Callable[[Msg], None],
        *,
        on_closed: Callable[[], None] | None = None,
        expires_s: float = PULL_EXPIRES_S,
    ) -> None:
        self._nc = nc
        self._on_closed = on_closed
        self._next_subject = subjects.consumer_next(stream, consumer)
        self._on_msg = on_msg
        self._expires_s = expires_s
        self._inbox = ""
        self._sub: Any = None
        self._ids = itertools.count(1)
        self._open: dict[str, tuple[int, float]] = {}
        """Reply token of each pull request not known to be closed → (messages asked, local expiry)."""
        self._expiries: collections.deque[tuple[float, str]] = collections.deque()
        """(local expiry, token) of the open requests, oldest first (they all live ``expires_s``)."""
        self.credit = 0
        """Messages asked for and not yet delivered."""
        self._bodies: dict[int, bytes] = {}
        self.draining = False
        """Set by :meth:`drain`: no new pull requests."""

    async def start(self) -> None:
        """Subscribe to the pull requests' replies."""
        self._inbox = self._nc.new_inbox()
        self._sub = await subscribe_direct(self._nc, f"{self._inbox}.*", self._on_reply)

    def drain(self) -> None:
        """Ask for nothing more; messages still owed keep arriving until :meth:`owed` says none are left."""
        self.draining = True

    def forget(self) -> None:
        """Forget every open request (the server lost them: it restarted), so the next top-up asks anew."""
        self._open.clear()
        self._expiries.clear()
        self.credit = 0

    def owed(self) -> bool:
        """Whether the server may still deliver on an open request (the subscription must stay until it may not)."""
        self._forget_expired()
        return self.credit > 0

    async def withdraw(self, flush_s: float) -> bool:
        """Remove the inbox's interest at the server, keep handling what it sent before; True once it sends no more.

        False when that could not be confirmed: then wait until :meth:`owed` is false before :meth:`stop`.
        """
        self.draining = True
        if self._sub is None:
            return True
        if not await withdraw(self._nc, self._sub, flush_s):
            return False
        self.credit = 0
        return True

    async def stop(self) -> None:
        """Stop receiving: after :meth:`withdraw`, or once :meth:`owed` is false (a dead inbox strands what it gets)."""
        if self._sub is not None:
            await self._sub.unsubscribe()
            self._sub = None

    def _forget_expired(self) -> None:
        expiries = self._expiries
        if expiries:
            now = time.monotonic()
            while expiries and now > expiries[0][0] + 1.0:
                # A filled request gets no status message: forget it once it would have expired anyway.
                self._open.pop(expiries.popleft()[1], None)
            if not self._open:
                # Every request is past its expiry: whatever they still owed, the server owes no more.
                self.credit = 0

    async def top_up(self, free: int) -> None:
        """Ask for ``free - credit`` more messages (when positive)."""
        self._forget_expired()
        want = free - self.credit
        if want <= 0 or self._sub is None or self.draining:
            return
        reply = self._register(want)
        await self._nc.publish(self._next_subject, self._body(want), reply=reply)

    async def ack_next(self, msg: Msg, free: int) -> None:
        """Ack ``msg`` and, in the same protocol message (``+NXT``), ask for what ``free`` slots can take.

        ``free`` counts the slot ``msg`` is about to give back.
        """
        want = free - self.credit
        if want <= 0 or self._sub is None or self.draining:
            await self._nc.publish(msg.reply, b"")
            return
        reply = self._register(want)
        await self._nc.publish(msg.reply, ACK_NEXT + self._body(want), reply=reply)

    def ack_next_now(self, msg: Msg, free: int) -> bool:
        """:meth:`ack_next` from a plain function (queued for the connection's flusher); False, having sent
        nothing, when it cannot be queued that way: use :meth:`ack_next`."""
        want = free - self.credit
        if want <= 0 or self._sub is None or self.draining:
            return publish_soon(self._nc, msg.reply, b"")
        reply = self._register(want)
        if publish_soon(self._nc, msg.reply, ACK_NEXT + self._body(want), reply=reply):
            return True
        self._open.pop(reply.rsplit(".", 1)[1], None)  # never sent: its expiry entry is dropped when it comes due
        self.credit -= want
        return False

    def _register(self, want: int) -> str:
        token = f"{next(self._ids):x}"
        expiry = time.monotonic() + self._expires_s
        self._open[token] = (want, expiry)
        self._expiries.append((expiry, token))
        self.credit += want
        return f"{self._inbox}.{token}"

    def _body(self, want: int) -> bytes:
        body = self._bodies.get(want)
        if body is None:
            body = self._bodies[want] = json.dumps({"batch": want, "expires": int(self._expires_s * 1e9)}).encode()
        return body

    def next_expiry(self) -> float:
        """Seconds until the earliest open request expires (how long to sleep when nothing else happens)."""
        if not self._expiries:
            return self._expires_s
        return max(0.0, self._expiries[0][0] - time.monotonic())

    def drained_by(self) -> float:
        """Seconds until every open request is past its expiry (and its grace): the longest a drain waits."""
        if not self._expiries:
            return 0.0
        return max(0.0, self._expiries[-1][0] + 1.0 - time.monotonic())

    def _on_reply(self, msg: Msg) -> None:
        headers = msg.headers
        if headers and STATUS in headers and not msg.data:
            status = headers.get(STATUS, "")
            if status == "100":
                return  # idle heartbeat
            # 408 expired, 409 closed, 404 nothing: the request owes what the server says it still owed.
            entry = self._open.pop(msg.subject[len(self._inbox) + 1 :], None)
            owed = headers.get(PENDING_MESSAGES)
            if owed is not None and owed.isdigit():
                self.credit -= int(owed)
            elif entry is not None:
                self.credit -= entry[0]
            self.credit = max(0, self.credit)
            if status not in ("404", "408"):
                log.warning("pull request closed: %s %s", status, headers.get("Description", ""))
            if self._on_closed is not None:
                self._on_closed()
            return
        # Delivered messages carry their stream subject, not the request's: count them globally.
        self.credit = max(0, self.credit - 1)
        self._on_msg(msg)

"""Hot-path shortcuts around nats-py's internal queues: subscriptions handled inside the read loop, and
publishes written to the socket at once.

Subscriptions: messages are handled synchronously, inside nats-py's read loop.

nats-py hands every message of a callback subscription to a per-subscription task through an ``asyncio.Queue``:
one queue put, one task wake-up and one coroutine call per message. On the hot paths (results coming back to a
caller, invocations reaching a replica) that hop costs as much as the rest of the handling, so these
subscriptions swap the queue for an object that calls a plain function at once. The handler must not block
and must not raise (an exception is logged and the message dropped, never propagated into the read loop).
When nats-py's internals differ from what this expects, it falls back to an ordinary callback subscription.

Publishes: ``nc.publish`` queues the command and wakes nats-py's flusher task, which writes it on the next turn of
the loop. :func:`publish_now` writes a message straight to the socket when nothing is queued before it (so the
order of messages holds), saving that loop turn on the paths where one message is all that is waiting;
:func:`publish_soon` queues one for the flusher from a plain function, without a coroutine or a task.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from nats.aio.msg import Msg
from nats.aio.transport import TcpTransport
from nats.protocol import command

log = logging.getLogger("duanflow.inbox")


class _DirectQueue:
    """Stands in for the subscription's pending queue: ``put_nowait`` runs the handler."""

    __slots__ = ("_handler", "_sub")

    def __init__(self, sub: Any, handler: Callable[[Msg], None]) -> None:
        self._sub = sub
        self._handler = handler

    def put_nowait(self, msg: Msg) -> None:
        self._sub._pending_size -= len(msg.data)
        try:
            self._handler(msg)
        except Exception:
            log.exception("handler of %s failed; message dropped", msg.subject)

    def empty(self) -> bool:
        return True

    def qsize(self) -> int:
        return 0

    def task_done(self) -> None:
        return None

    async def join(self) -> None:
        return None


async def subscribe_direct(nc: Any, subject: str, handler: Callable[[Msg], None], *, queue: str = "") -> Any:
    """Subscribe ``handler`` (a plain function) to ``subject`` (in queue group ``queue``, if given); returns the
    nats-py subscription."""
    sub = await nc.subscribe(subject, queue=queue, pending_bytes_limit=0)
    if hasattr(sub, "_pending_queue") and hasattr(sub, "_pending_size") and getattr(sub, "_cb", None) is None:
        sub._pending_queue = _DirectQueue(sub, handler)
        return sub
    await sub.unsubscribe()

    async def cb(msg: Msg) -> None:
        try:
            handler(msg)
        except Exception:
            log.exception("handler of %s failed; message dropped", msg.subject)

    return await nc.subscribe(subject, queue=queue, cb=cb)


def publish_now(nc: Any, subject: str, payload: bytes, headers: dict[str, str] | None = None) -> bool:
    """Write one message to ``subject`` straight to the socket, if that keeps the order of messages.

    Returns False, having sent nothing, when the connection is not a plain connected TCP one, or when other
    commands are queued or unsent before it: the caller then uses ``await nc.publish(...)``. ``headers`` are
    DuanFlow's own (ids, inboxes, trace context), written as they are.
    """
    transport = getattr(nc, "_transport", None)
    if type(transport) is not TcpTransport or nc._pending_data_size or not nc.is_connected:
        return False
    writer = transport._io_writer
    if writer is None or writer.transport.get_write_buffer_size():
        return False
    writer.write(_command(subject, payload, headers))
    nc.stats["out_msgs"] += 1
    nc.stats["out_bytes"] += len(payload)
    return True


def publish_soon(
    nc: Any, subject: str, payload: bytes, headers: dict[str, str] | None = None, *, reply: str = ""
) -> bool:
    """Queue one message for nats-py's flusher from a plain function (no coroutine, no task): it leaves with
    everything else queued, in one write, on the loop's next turn.

    Returns False, having queued nothing, when nats-py's internals are not what this expects, the connection is
    not up, or its pending buffer is full: the caller then uses ``nc.publish`` from a task.
    """
    queue = getattr(nc, "_flush_queue", None)
    if not isinstance(queue, asyncio.Queue) or not isinstance(getattr(nc, "_pending", None), list):
        return False
    cmd = _command(subject, payload, headers, reply)
    limit = nc._max_pending_size
    if not nc.is_connected or (limit > 0 and nc._pending_data_size + len(cmd) > limit):
        return False
    if queue.empty():  # one wake-up of the flusher writes everything queued by then
        if queue.full():
            return False
        queue.put_nowait(asyncio.get_running_loop().create_future())
    nc._pending.append(cmd)  # the flusher swaps in a fresh list after each write: look it up every time
    nc._pending_data_size += len(cmd)
    nc.stats["out_msgs"] += 1
    nc.stats["out_bytes"] += len(payload)
    return True


def more_to_read(nc: Any) -> bool:
    """Whether the read that brought the message being handled brought more after it (nats-py's parser buffer
    is not empty): its answer can then wait to leave with theirs."""
    parser = getattr(nc, "_ps", None)
    return bool(getattr(parser, "buf", None))


def _command(subject: str, payload: bytes, headers: dict[str, str] | None, reply: str = "") -> bytes:
    if headers:
        hdr = "".join([f"{k}: {v}\r\n" for k, v in headers.items()])
        return command.hpub_cmd(subject, reply, f"NATS/1.0\r\n{hdr}\r\n".encode(), payload)
    return command.pub_cmd(subject, reply, payload)


async def withdraw(nc: Any, sub: Any, flush_s: float) -> bool:
    """Remove ``sub``'s interest at the server while still handling what the server sent before: True once the
    server's PONG says it sends no more, False when that could not be confirmed. Unsubscribe locally afterwards.

    nats-py's ``unsubscribe()`` drops the local subscription at once, so a message already on its way is lost; the
    UNSUB sent alone, then a flush (the PONG follows every message sent before it), loses nothing.
    """
    send_unsubscribe = getattr(nc, "_send_unsubscribe", None)
    sid = getattr(sub, "_id", None)
    if send_unsubscribe is None or not isinstance(sid, int):
        return False
    try:
        await send_unsubscribe(sid)
        await nc.flush(timeout=flush_s)
    except Exception as exc:
        log.warning("could not withdraw the subscription to %s: %s", getattr(sub, "subject", "?"), exc)
        return False
    return True

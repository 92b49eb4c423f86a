"""Python ``logging`` records of a replica, with their level: every line of a record is written to stderr behind
``LEVEL_MARK`` and the level, which the agent's log relay turns into the line's ``level`` on the logs stream."""

from __future__ import annotations

import logging
import sys

from duanflow_proto.messages.logs import LEVEL_MARK

_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def level_of(levelno: int) -> str:
    """The log line level of a ``logging`` level number.

    >>> [level_of(n) for n in (5, logging.DEBUG, logging.INFO, logging.WARNING, logging.ERROR, logging.CRITICAL)]
    ['debug', 'debug', 'info', 'warning', 'error', 'error']
    """
    if levelno >= logging.ERROR:
        return "error"
    if levelno >= logging.WARNING:
        return "warning"
    return "info" if levelno >= logging.INFO else "debug"


class LevelFormatter(logging.Formatter):
    """Prefixes every line of a formatted record (tracebacks included) with the level mark."""

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"{LEVEL_MARK}{level_of(record.levelno)}\t"
        return "\n".join(prefix + line for line in super().format(record).split("\n"))


def install(level: int = logging.INFO) -> None:
    """Send the root logger to stderr with levels marked (the replica's ``logging.basicConfig``)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(LevelFormatter(_FORMAT))
    logging.basicConfig(level=level, handlers=[handler])

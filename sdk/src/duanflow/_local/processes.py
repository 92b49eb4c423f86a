"""Finding and stopping every process of a local stack, including the ones its processes started.

Each component runs in its own session (``start_new_session=True``), so its session id is its pid and
signalling the session reaches its children (Postgres backends, replicas the agent started). A child
that made a session of its own is still found as a descendant, and one orphaned by a crash is found by
the ``DUANFLOW_STACK_ID`` marker every process of the stack inherits.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterable
from pathlib import Path

import psutil

STACK_ID_ENV = "DUANFLOW_STACK_ID"


def create_time(pid: int) -> float:
    """Start time of ``pid`` (0.0 when it is gone)."""
    try:
        return float(psutil.Process(pid).create_time())
    except (psutil.Error, OSError):
        return 0.0


def is_running(pid: int) -> bool:
    """True when ``pid`` runs; a zombie counts as gone (and is reaped when it is our child)."""
    if pid <= 0:
        return False
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)
    try:
        return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
    except (psutil.Error, OSError):
        return False


def same_process(pid: int, started: float) -> bool:
    """True when ``pid`` runs and is the process that started at ``started`` (not a recycled pid)."""
    if not is_running(pid):
        return False
    return not started or abs(create_time(pid) - started) < 1.0


def session_members(sid: int) -> set[int]:
    """Pids of the processes in session ``sid``."""
    found: set[int] = set()
    for proc in psutil.process_iter():
        with contextlib.suppress(psutil.Error, OSError):
            if os.getsid(proc.pid) == sid:
                found.add(proc.pid)
    return found


def descendants(pid: int) -> set[int]:
    """Pids of every process below ``pid``."""
    try:
        return {c.pid for c in psutil.Process(pid).children(recursive=True)}
    except (psutil.Error, OSError):
        return set()


def marked(stack_id: str) -> set[int]:
    """Pids of the processes whose environment carries ``DUANFLOW_STACK_ID=stack_id``."""
    found: set[int] = set()
    me = os.getpid()
    for proc in psutil.process_iter():
        if proc.pid == me:
            continue
        with contextlib.suppress(psutil.Error, OSError):
            if proc.environ().get(STACK_ID_ENV) == stack_id:
                found.add(proc.pid)
    return found


def working_in(directory: Path) -> set[int]:
    """Pids of the processes whose working directory is ``directory`` or below it."""
    root = str(directory.resolve())
    found: set[int] = set()
    for proc in psutil.process_iter(["cwd"]):
        with contextlib.suppress(psutil.Error, OSError):
            cwd = proc.info["cwd"] or ""
            if cwd == root or cwd.startswith(root + os.sep):
                found.add(proc.pid)
    return found


def ancestry(pid: int) -> set[int]:
    """``pid`` and every process above it (never to be stopped by the stack it runs)."""
    try:
        proc = psutil.Process(pid)
        return {pid} | {p.pid for p in proc.parents()}
    except (psutil.Error, OSError):
        return {pid}


def family(pid: int) -> set[int]:
    """``pid``, the members of its session and its descendants (when ``pid`` still runs)."""
    if not is_running(pid):
        return set()
    return {pid} | session_members(pid) | descendants(pid)


def terminate(
    pids: Iterable[int], *, sig: int = signal.SIGTERM, grace: float = 10.0, sessions: Iterable[int] = ()
) -> None:
    """Send ``sig`` to ``pids`` (and to the process groups ``sessions``), SIGKILL what remains after ``grace``.

    Returns once every one of them is gone (or after a last few seconds for an unkillable one).
    """
    targets = {p for p in pids if p > 0 and p != os.getpid()}
    groups = [s for s in sessions if s > 0]
    _signal_all(targets, groups, sig)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        targets = {p for p in targets if is_running(p)}
        if not targets:
            return
        time.sleep(0.05)
    _signal_all(targets, groups, signal.SIGKILL)
    end = time.monotonic() + 5.0
    while time.monotonic() < end and any(is_running(p) for p in targets):
        time.sleep(0.02)


def _signal_all(pids: set[int], groups: list[int], sig: int) -> None:
    for sid in groups:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(sid, sig)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)

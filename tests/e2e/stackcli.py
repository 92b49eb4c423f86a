"""Drive the ``duanflow`` CLI as a user would: a subprocess with its own ``DUANFLOW_HOME``."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[2]


def user_env(home: Path) -> dict[str, str]:
    """The environment of a user whose DuanFlow home is ``home`` (no overrides leaking in from ours)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DUANFLOW_")}
    env["DUANFLOW_HOME"] = str(home)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def cli(
    home: Path, *args: str | Path, timeout: float = 120.0, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """``duanflow ARGS`` (through ``python -m duanflow._cli``), from the repository root; ``env`` adds variables."""
    return subprocess.run(
        [sys.executable, "-m", "duanflow._cli", *map(str, args)],
        cwd=REPO,
        env={**user_env(home), **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def python(home: Path, code: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    """``python -c CODE`` as the same user, from the repository root."""
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        env=user_env(home),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def stack_pids(data_dir: Path, state: dict[str, object]) -> set[int]:
    """Every live process of a running stack: its components, their descendants, anything working in its dir."""
    comps = state["components"]
    assert isinstance(comps, dict)
    pids: set[int] = set()
    for comp in comps.values():
        pid = int(comp["pid"])
        with contextlib.suppress(psutil.Error):
            proc = psutil.Process(pid)
            pids |= {pid} | {c.pid for c in proc.children(recursive=True)}
    return pids | in_dir(data_dir)


def in_dir(data_dir: Path) -> set[int]:
    """Live processes whose command line or working directory is under ``data_dir``."""
    found: set[int] = set()
    root = str(data_dir)
    for proc in psutil.process_iter(["cmdline", "cwd"]):
        with contextlib.suppress(psutil.Error):
            if proc.pid == os.getpid():
                continue
            cmd = proc.info["cmdline"] or ()
            if any(root in part for part in cmd) or (proc.info["cwd"] or "").startswith(root):
                found.add(proc.pid)
    return found


def alive(pids: set[int]) -> set[int]:
    """The ones still running (zombies count as gone)."""
    left: set[int] = set()
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                left.add(pid)
    return left


@contextlib.contextmanager
def stopped_at_exit(home: Path, data_dir: Path) -> Iterator[None]:
    """Whatever happens in the test, ``dev down`` at the end."""
    try:
        yield
    finally:
        cli(home, "dev", "down", "--data-dir", data_dir, timeout=120)

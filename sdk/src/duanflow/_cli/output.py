"""Where the CLI writes: results on stdout, progress and errors on stderr, and the one way it fails."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import NoReturn

import typer
from duanflow_proto.errors import DuanFlowError
from rich.console import Console
from rich.markup import escape

out = Console(highlight=False, soft_wrap=True)
"""Results and tables (stdout)."""
err = Console(stderr=True, highlight=False, soft_wrap=True)
"""Progress, notes and errors (stderr): stdout stays clean for scripts."""


class CliError(Exception):
    """A user-facing failure: printed as one red line (plus an optional hint), exit code 1."""

    def __init__(self, message: str, *, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint


def fail(message: str, *, hint: str = "", code: int = 1) -> NoReturn:
    """Print ``✗ message`` (and ``hint``) in red on stderr and exit with ``code``."""
    err.print(f"[bold red]✗[/bold red] [red]{escape(message)}[/red]")
    if hint:
        err.print(escape(hint), style="dim")
    raise typer.Exit(code)


@contextlib.contextmanager
def errors_handled() -> Iterator[None]:
    """Turn every failure of a command into one clear message and exit code 1, never a traceback.

    ``DUANFLOW_DEBUG=1`` lets unexpected exceptions through with their traceback (for bug reports).
    """
    try:
        yield
    except (typer.Exit, typer.Abort):
        raise
    except CliError as exc:
        fail(exc.message, hint=exc.hint)
    except DuanFlowError as exc:
        fail(_with_code(exc))
    except KeyboardInterrupt:
        err.print("interrupted")
        raise typer.Exit(130) from None
    except Exception as exc:
        if os.environ.get("DUANFLOW_DEBUG"):
            raise
        fail(
            f"unexpected error: {type(exc).__name__}: {exc}",
            hint="set DUANFLOW_DEBUG=1 to see the traceback, and please report it",
        )


def _with_code(exc: DuanFlowError) -> str:
    text = exc.message or type(exc).__name__
    remote = (exc.remote_traceback or "").strip()
    if remote and remote not in text:
        text += "\n" + remote
    return text

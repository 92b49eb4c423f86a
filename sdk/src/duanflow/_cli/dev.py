"""``duanflow dev``: the embedded local stack (up, status, down). The logic lives in :mod:`duanflow._local.stack`."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from duanflow import _config
from duanflow._cli.output import err, errors_handled, fail, out
from duanflow._local.stack import ComponentStartError, Stack, StackError, default_data_dir
from duanflow._local.state import StackState
from duanflow._local.status import StackStatus

app = typer.Typer(
    name="dev",
    help="Run DuanFlow on this machine: real NATS, Postgres and S3, the five services and one agent.",
    no_args_is_help=True,
    add_completion=False,
)

DataDir = Annotated[
    Path | None,
    typer.Option(
        "--data-dir", help="Where the stack keeps its state [default: $DUANFLOW_HOME/local].", show_default=False
    ),
]
Json = Annotated[bool, typer.Option("--json", help="Print one JSON object instead of a table.")]

SIMULATED_NOTE = (
    "No NVIDIA GPU visible: the local agent offers a simulated inventory (one GPU of each catalog type); "
    "functions run on the CPU."
)


def _flag(data_dir: Path | None) -> str:
    """``--data-dir X`` when it is not the default, for the commands we suggest."""
    if data_dir is None or data_dir.expanduser().resolve() == default_data_dir().expanduser().resolve():
        return ""
    return f" --data-dir {data_dir}"


@app.command()
def up(
    detach: Annotated[
        bool, typer.Option("--detach", "-d", help="Return once healthy and leave the stack running.")
    ] = False,
    data_dir: DataDir = None,
    json_out: Json = False,
    timeout: Annotated[float, typer.Option(help="Seconds each service has to turn healthy.")] = 90.0,
) -> None:
    """Start NATS, Postgres, S3, the five services and one agent on loopback; write the `local` profile.

    Without --detach it stays in the foreground and Ctrl-C stops everything; with --detach it returns once
    every component is healthy (stop it with `duanflow dev down`). --data-dir keeps state between runs.
    """
    started = time.monotonic()

    def progress(msg: str) -> None:
        if not json_out:
            err.print(f"[dim]  {escape(msg)}[/dim]")

    with errors_handled():
        if not json_out:
            err.print("Starting the local DuanFlow stack…")
        try:
            with err.status("starting", spinner="dots") if not json_out else contextlib.nullcontext():
                state = Stack.up(data_dir, detach=detach, timeout=timeout, progress=progress)
        except ComponentStartError as exc:
            fail(
                f"{exc.component} failed to start (log: {exc.log_path}); everything started was stopped",
                hint=str(exc),
            )
        except StackError as exc:
            fail(str(exc))
        elapsed = time.monotonic() - started
        flag = _flag(data_dir)
        if json_out:
            out.print_json(data={"healthy": True, "elapsed_s": round(elapsed, 2), **_state_dict(state)})
        else:
            out.print(_state_table(state))
            if state.simulated:
                out.print(SIMULATED_NOTE)
            out.print(
                f"Ready in {elapsed:.1f}s. Profile [bold]local[/bold] written to {escape(str(_config.config_path()))}."
            )
        if detach:
            if not json_out:
                out.print(
                    f"Stop it with [bold]duanflow dev down{flag}[/bold]; check it with `duanflow dev status{flag}`."
                )
            return
        if not json_out:
            out.print("Running in the foreground: press Ctrl-C to stop everything.")
        why = Stack.serve(state, notify=lambda m: err.print(f"[yellow]{escape(m)}[/yellow]"))
        if not json_out:
            out.print(f"Local stack stopped ({why}).")


@app.command()
def status(data_dir: DataDir = None, json_out: Json = False) -> None:
    """Show each component, its address, pid and health; exit code 1 when not healthy or not running."""
    with errors_handled():
        st = Stack.status(data_dir)
    if json_out:
        out.print_json(data=st.to_dict())
    elif not st.running:
        out.print(
            f"No local stack is running from {escape(st.data_dir)}: start one with `duanflow dev up{_flag(data_dir)}`."
        )
    else:
        out.print(_status_table(st))
        verdict = "[green]healthy[/green]" if st.healthy else "[red]not healthy[/red]"
        out.print(f"Local stack {verdict}.")
    if not st.healthy:
        raise typer.Exit(1)


@app.command()
def down(data_dir: DataDir = None) -> None:
    """Stop every process the local stack started (services and replicas first, then S3, Postgres, NATS).

    Safe to run twice: with nothing running it says so and exits 0.
    """
    with errors_handled(), err.status("stopping the local stack", spinner="dots"):
        stopped = Stack.down(data_dir)
    if not stopped:
        out.print("Nothing running.")
        return
    out.print(f"Stopped the local stack ({', '.join(stopped)}).")


def _state_dict(state: StackState) -> dict[str, object]:
    return {
        "data_dir": state.data_dir,
        "nats_url": state.nats_url,
        "gateway_url": state.gateway_url,
        "s3_endpoint": state.s3_endpoint,
        "postgres_dsn": state.postgres_dsn,
        "simulated": state.simulated,
        "components": {
            n: {"pid": c.pid, "address": c.address, "log": c.log, **c.details} for n, c in state.components.items()
        },
    }


def _state_table(state: StackState) -> Table:
    table = Table(title=f"DuanFlow local stack ({state.data_dir})", title_justify="left")
    table.add_column("component", no_wrap=True)
    table.add_column("address", overflow="fold")
    table.add_column("pid", justify="right")
    for name, comp in state.components.items():
        label = f"{name} [yellow](simulated GPUs)[/yellow]" if name == "agent" and state.simulated else name
        table.add_row(label, escape(comp.address), str(comp.pid))
    table.caption = f"logs: {Path(state.data_dir) / 'logs'}/<component>.log"
    table.caption_justify = "left"
    return table


def _status_table(st: StackStatus) -> Table:
    table = Table(title=f"DuanFlow local stack ({st.data_dir})", title_justify="left")
    for col in ("component", "address", "pid", "health", "detail"):
        table.add_column(col, overflow="fold")
    for name, comp in st.components.items():
        health = "[green]healthy[/green]" if comp.healthy else "[red]down[/red]"
        label = f"{name} [yellow](simulated)[/yellow]" if comp.simulated else name
        table.add_row(label, comp.address, str(comp.pid), health, comp.detail)
    return table


def main() -> None:
    """Run ``duanflow dev`` on its own (``python -m duanflow._local``)."""
    app()


if __name__ == "__main__":
    main()

"""``duanflow jobs``: list long GPU jobs (``@app.job``), show one, cancel one."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

import msgspec
import typer
from duanflow_proto.messages.jobs import STATES, JobInfo
from rich.markup import escape
from rich.table import Table

from duanflow import _job
from duanflow._cli.output import CliError, errors_handled, out
from duanflow._client import get_client

app = typer.Typer(
    name="jobs",
    help="Long GPU jobs (@app.job): list them, show one's state, cancel one.",
    no_args_is_help=True,
    add_completion=False,
)

IdArg = Annotated[str, typer.Argument(metavar="ID", help="The job's id (jb-…), as `duanflow jobs list` shows it.")]
EnvOpt = Annotated[
    str | None,
    typer.Option("--env", "-e", help="Environment [default: the profile's, usually main].", show_default=False),
]
AppOpt = Annotated[str | None, typer.Option("--app", "-a", help="Only this app's jobs.", show_default=False)]
StateOpt = Annotated[
    str | None,
    typer.Option("--state", "-s", help=f"Only jobs in this state ({', '.join(STATES)}).", show_default=False),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON on stdout.")]
LimitOpt = Annotated[int, typer.Option("--limit", "-n", min=1, max=1000, help="Most jobs listed.")]


def _when(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000).strftime("%Y-%m-%d %H:%M:%S") if ms else "-"


def _duration(job: JobInfo) -> str:
    if not job.started_ms:
        return "-"
    end = job.finished_ms or int(datetime.now().timestamp() * 1000)
    seconds = max(0, end - job.started_ms) / 1000
    return f"{seconds:.1f}s" if seconds < 120 else f"{seconds / 60:.1f}m"


def as_dict(job: JobInfo) -> dict[str, Any]:
    """The job as plain JSON data (what ``--json`` prints)."""
    data: dict[str, Any] = msgspec.to_builtins(job)
    data.pop("type", None)
    return data


def _check_state(state: str | None) -> str:
    if state and state not in STATES:
        raise CliError(f"--state {state!r} is not a job state", hint=f"valid states: {', '.join(STATES)}")
    return state or ""


@app.command("list")
def list_(
    app_name: AppOpt = None,
    env: EnvOpt = None,
    state: StateOpt = None,
    limit: LimitOpt = 100,
    json_out: JsonOpt = False,
) -> None:
    """Jobs, newest first: id, app, function, state, GPUs, started, duration.

    ```
    duanflow jobs list --app customer-ai-api
    ```
    """
    with errors_handled():
        wanted = _check_state(state)
        client = get_client()
        got = client.run(_job.list_jobs, client, env or client.env, app_name or "", wanted, limit)
        if json_out:
            out.print_json(data={"jobs": [as_dict(j) for j in got.jobs]})
            return
        if not got.jobs:
            out.print("no jobs" + (f" of {app_name}" if app_name else "") + f" in {env or client.env}")
            return
        table = Table(title=f"jobs ({env or client.env})", title_justify="left")
        for col in ("id", "app", "function", "state", "GPUs", "created", "ran"):
            table.add_column(col)
        for j in got.jobs:
            gpus = f"{j.agent_id}:{','.join(map(str, j.gpu_indices))}" if j.agent_id else "-"
            table.add_row(j.job_id, j.app, j.function, j.state, escape(gpus), _when(j.created_ms), _duration(j))
        out.print(table)


def _show(job: JobInfo) -> None:
    table = Table(show_header=False, title=f"job {job.job_id}", title_justify="left")
    table.add_column("field", style="bold")
    table.add_column("value")
    rows = [
        ("app", f"{job.app} ({job.env}, {job.release_id})"),
        ("function", job.function),
        ("state", job.state),
        ("replica", job.replica_id or "-"),
        ("GPUs", f"{job.agent_id} {job.gpu_type} {job.gpu_indices}" if job.agent_id else "-"),
        ("timeout", f"{job.timeout_s:g}s"),
        ("created", _when(job.created_ms)),
        ("started", _when(job.started_ms)),
        ("finished", _when(job.finished_ms)),
        ("ran", _duration(job)),
    ]
    if job.error:
        rows.append(("error", job.error))
    if job.message and not job.finished_ms:
        rows.append(("note", job.message))
    for k, v in rows:
        table.add_row(k, escape(v))
    out.print(table)
    if job.traceback:
        out.print(escape(job.traceback.rstrip()), style="dim")


@app.command()
def status(job_id: IdArg, json_out: JsonOpt = False) -> None:
    """One job: its state, replica and GPUs, times, and the error (with traceback) of a failed job.

    ```
    duanflow jobs status jb-0123456789abcdef
    ```
    """
    with errors_handled():
        client = get_client()
        job = client.run(_job.status, client, job_id)
        if json_out:
            out.print_json(data=as_dict(job))
            return
        _show(job)


@app.command()
def cancel(job_id: IdArg, json_out: JsonOpt = False) -> None:
    """Cancel a job: it is marked cancelled, its replica is stopped and its GPUs are freed.

    ```
    duanflow jobs cancel jb-0123456789abcdef
    ```
    """
    with errors_handled():
        client = get_client()
        job = client.run(_job.cancel, client, job_id)
        if json_out:
            out.print_json(data=as_dict(job))
            return
        verb = "cancelled" if job.state == "cancelled" else f"already {job.state}"
        out.print(f"job {job.job_id} {verb}")

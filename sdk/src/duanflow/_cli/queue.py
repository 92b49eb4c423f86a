"""``duanflow queue``: inspect a work queue, list its dead letters, put them back."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, TypeVar

import typer
from duanflow_proto import subjects
from duanflow_proto.messages.queue import DeadLetterList, QueueInfo, QueueReplayReply, QueueRequest
from rich.markup import escape
from rich.table import Table

from duanflow._cli.output import errors_handled, out
from duanflow._client import get_client

T = TypeVar("T")

app = typer.Typer(
    name="queue",
    help="Inspect work queues (df.Queue): depth, jobs in flight, dead letters; replay dead letters.",
    no_args_is_help=True,
    add_completion=False,
)

NameArg = Annotated[str, typer.Argument(metavar="NAME", help="The queue's name, as in df.Queue(NAME).")]
EnvOpt = Annotated[
    str | None,
    typer.Option("--env", "-e", help="Environment [default: the profile's, usually main].", show_default=False),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON on stdout.")]
LimitOpt = Annotated[int, typer.Option("--limit", "-n", min=1, max=10_000, help="Most dead letters.")]


def _ask(subject: str, name: str, env: str | None, limit: int, reply_type: type[T]) -> T:
    client = get_client()
    req = QueueRequest(queue=name, env=env or client.env, limit=limit)

    async def ask() -> T:
        return await client.request(subject, req, reply_type)

    return client.run(ask)


@app.command()
def inspect(name: NameArg, env: EnvOpt = None, json_out: JsonOpt = False) -> None:
    """Depth (jobs not finished), jobs waiting and in flight, and dead letters of queue NAME.

    ```
    duanflow queue inspect audio-inbox
    ```
    """
    with errors_handled():
        info = _ask(subjects.API_QUEUE_INSPECT, name, env, 1, QueueInfo)
        row = {
            "queue": info.queue,
            "env": info.env,
            "depth": info.depth,
            "waiting": info.waiting,
            "in_flight": info.in_flight,
            "dead": info.dead,
            "has_worker": info.has_consumer,
        }
        if json_out:
            out.print_json(data=row)
            return
        table = Table(title=f"queue {info.queue} ({info.env})", title_justify="left")
        for col in ("depth", "waiting", "in flight", "dead letters", "worker deployed"):
            table.add_column(col, justify="right")
        table.add_row(
            str(info.depth),
            str(info.waiting),
            str(info.in_flight),
            str(info.dead),
            "yes" if info.has_consumer else "no",
        )
        out.print(table)


@app.command()
def dead(name: NameArg, env: EnvOpt = None, limit: LimitOpt = 100, json_out: JsonOpt = False) -> None:
    """List the dead letters of queue NAME: job id, attempts, last error (--json: with tracebacks).

    ```
    duanflow queue dead audio-inbox
    ```
    """
    with errors_handled():
        found = _ask(subjects.API_QUEUE_DEAD, name, env, limit, DeadLetterList)
        if json_out:
            rows = [
                {
                    "job_id": d.job_id,
                    "attempts": d.attempts,
                    "error": d.error,
                    "exc_type": d.exc_type,
                    "traceback": d.traceback,
                    "failed_at": d.failed_at,
                    "seq": d.seq,
                }
                for d in found.letters
            ]
            out.print_json(data={"queue": name, "dead_letters": rows})
            return
        if not found.letters:
            out.print(f"No dead letters in queue {escape(name)}.")
            return
        table = Table(title=f"dead letters of {name}", title_justify="left")
        for col in ("job id", "attempts", "failed at", "error"):
            table.add_column(col)
        for d in found.letters:
            when = datetime.fromtimestamp(d.failed_at).strftime("%Y-%m-%d %H:%M:%S") if d.failed_at else ""
            table.add_row(escape(d.job_id), str(d.attempts), when, escape(d.error))
        out.print(table)


@app.command()
def replay(name: NameArg, env: EnvOpt = None, limit: LimitOpt = 10_000, json_out: JsonOpt = False) -> None:
    """Put the dead letters of queue NAME back on the queue (same job ids; retries start over).

    ```
    duanflow queue replay audio-inbox
    ```
    """
    with errors_handled():
        reply = _ask(subjects.API_QUEUE_REPLAY, name, env, limit, QueueReplayReply)
        if json_out:
            out.print_json(data={"queue": name, "replayed": reply.replayed})
            return
        out.print(f"Replayed {len(reply.replayed)} dead letter(s) onto queue [bold]{escape(name)}[/bold].")

"""``duanflow apps`` (the active release of every app) and ``duanflow stop APP``."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

import typer
from duanflow_proto import subjects
from duanflow_proto.messages.release import AppStopReply, AppStopRequest, ReleaseList, ReleaseListRequest
from rich.markup import escape
from rich.table import Table

from duanflow._cli.output import errors_handled, out
from duanflow._client import get_client

EnvOpt = Annotated[
    str | None,
    typer.Option("--env", "-e", help="Environment [default: the profile's, usually main].", show_default=False),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON on stdout.")]


def apps(env: EnvOpt = None, json_out: JsonOpt = False) -> None:
    """List the deployed apps of an environment with their active release.

    ```
    duanflow apps
    ```
    """
    with errors_handled():
        client = get_client()
        env = env or client.env
        found = client.run(client.request, subjects.API_RELEASES, ReleaseListRequest(app="", env=env), ReleaseList)
        active = sorted((r for r in found.releases if r.active), key=lambda r: r.app)
        if json_out:
            rows = [
                {
                    "app": r.app,
                    "release": r.release_id,
                    "created_ms": r.created_ms,
                    "image_id": r.image_id,
                    "functions": [f.name for f in r.spec.functions],
                }
                for r in active
            ]
            out.print_json(data={"env": env, "apps": rows})
            return
        if not active:
            out.print(f"No apps deployed in env {escape(env)}. Deploy one: duanflow deploy app.py")
            return
        table = Table(title=f"apps ({env})", title_justify="left")
        for col in ("app", "release", "deployed", "functions"):
            table.add_column(col)
        for r in active:
            when = datetime.fromtimestamp(r.created_ms / 1000).strftime("%Y-%m-%d %H:%M:%S")
            table.add_row(r.app, r.release_id, when, ", ".join(f.name for f in r.spec.functions))
        out.print(table)


def stop(
    app_name: Annotated[str, typer.Argument(metavar="APP", help="The app's name, as in df.App(...).")],
    env: EnvOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Stop APP: no active release, no HTTP routes, its replicas drained and stopped (releases are kept).

    Bring it back with `duanflow deploy` or `duanflow rollback APP --to rel_...`.

    ```
    duanflow stop customer-ai-api
    ```
    """
    with errors_handled():
        client = get_client()
        env = env or client.env
        reply = client.run(
            client.request, subjects.API_APP_STOP, AppStopRequest(app=app_name, env=env), AppStopReply, 120.0
        )
        client.forget(app_name, env)
        if json_out:
            out.print_json(
                data={"app": reply.app, "env": reply.env, "release": reply.release, "replicas": reply.replicas}
            )
            return
        was = f" (release {reply.release})" if reply.release else ""
        out.print(
            f"Stopped [bold]{escape(reply.app)}[/bold]{escape(was)} in env {escape(reply.env)}: "
            f"{len(reply.replicas)} replica(s) drained."
        )


def register(cli: typer.Typer) -> None:
    """Add ``apps`` and ``stop`` to the ``duanflow`` command."""
    cli.command(name="apps")(apps)
    cli.command(name="stop")(stop)

"""``duanflow auth``: connect the CLI and SDK to a DuanFlow server (a profile in ``$DUANFLOW_HOME/config.toml``).

A profile is a NATS URL and the *client* role's credentials (the token is that role's password); ``duanflow
dev up`` writes the ``local`` one itself.
"""

from __future__ import annotations

import sys
from typing import Annotated

import typer
from duanflow_proto import subjects
from duanflow_proto.messages.common import HealthReply, HealthRequest
from rich.markup import escape

from duanflow import _config
from duanflow._cli.output import CliError, errors_handled, out
from duanflow._client import Client

app = typer.Typer(
    name="auth",
    help="Log in to a DuanFlow server (writes a profile) and see which one is active.",
    no_args_is_help=True,
    add_completion=False,
)

CHECK_TIMEOUT_S = 10.0


@app.command()
def login(
    server: Annotated[
        str | None, typer.Option("--server", help="The server's NATS URL, e.g. nats://duanflow.example:4222.")
    ] = None,
    token: Annotated[
        str | None, typer.Option("--token", help="Your access token (the client role's password).")
    ] = None,
    user: Annotated[str, typer.Option("--user", help="NATS user of the client role.")] = "client",
    env: Annotated[str, typer.Option("--env", "-e", help="Default environment for deploys and calls.")] = "main",
    gateway: Annotated[str, typer.Option("--gateway", help="The server's HTTP gateway URL (for endpoints).")] = "",
    profile: Annotated[str, typer.Option("--profile", help="Name of the profile to write.")] = "default",
) -> None:
    """Check that the server answers with these credentials, then save them as the active profile.

    Prompts for what is not given when run in a terminal.

    ```
    duanflow auth login --server nats://gpu-box:4222 --token $DUANFLOW_TOKEN
    ```
    """
    with errors_handled():
        if server is None or token is None:
            if not sys.stdin.isatty():
                raise CliError("give --server and --token (no terminal to ask in)")
            server = server or typer.prompt("Server (NATS URL)")
            token = token or typer.prompt("Token", hide_input=True)
        try:
            subjects.token(profile)
            subjects.token(env)
        except ValueError as exc:
            raise CliError(str(exc)) from None
        prof = _config.Profile(nats_url=server, nats_user=user, nats_password=token, env=env, gateway_url=gateway)
        client = Client(prof)
        try:
            health = client.run(
                client.request,
                subjects.health("router"),
                HealthRequest(),
                HealthReply,
                CHECK_TIMEOUT_S,
            )
        finally:
            client.close()
        path = _config.save_profile(profile, prof)
        out.print(
            f"Logged in to {escape(server)} (router {escape(health.instance or 'ok')}); "
            f"profile [bold]{escape(profile)}[/bold] is active ({escape(str(path))})."
        )


@app.command()
def status() -> None:
    """Show the active profile and the others (never their tokens)."""
    with errors_handled():
        active, profiles = _config.load_all()
        if not profiles:
            raise CliError(
                f"no profiles in {_config.config_path()}",
                hint="start a local stack with `duanflow dev up` or run `duanflow auth login`",
            )
        for name, prof in sorted(profiles.items()):
            mark = "[green]●[/green]" if name == active else " "
            out.print(f"{mark} [bold]{escape(name)}[/bold]  {escape(prof.nats_url)}  env={escape(prof.env)}")

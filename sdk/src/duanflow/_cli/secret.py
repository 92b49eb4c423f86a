"""``duanflow secret``: create, list and delete the secrets an app injects with ``df.Secret.from_name(NAME)``.

Values travel once, to the router, which stores them encrypted; nothing ever prints them back.
"""

from __future__ import annotations

import re
from datetime import datetime
from pathlib import Path
from typing import Annotated

import typer
from duanflow_proto import subjects
from duanflow_proto.messages.secret import (
    SecretCreateRequest,
    SecretDeleteRequest,
    SecretInfo,
    SecretList,
    SecretListRequest,
)
from rich.markup import escape
from rich.table import Table

from duanflow._cli.output import CliError, errors_handled, out
from duanflow._client import get_client

app = typer.Typer(
    name="secret",
    help="Store secrets (API keys, tokens) that apps get as environment variables.",
    no_args_is_help=True,
    add_completion=False,
)

_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

EnvOpt = Annotated[
    str | None,
    typer.Option("--env", "-e", help="Environment [default: the profile's, usually main].", show_default=False),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON on stdout.")]


def parse_pairs(pairs: list[str]) -> dict[str, str]:
    """``KEY=VALUE`` arguments as a dict (the value may hold ``=``; an empty value is allowed)."""
    values: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise CliError(
                f"{_redact(pair)!r} is not KEY=VALUE", hint="e.g. duanflow secret create hf-prod HF_TOKEN=..."
            )
        if not _KEY.match(key):
            raise CliError(f"{key!r} is not an environment variable name (letters, digits and _)")
        values[key] = value
    return values


def parse_dotenv(text: str, source: str) -> dict[str, str]:
    """The ``KEY=VALUE`` lines of a dotenv file: comments, blanks and ``export`` dropped, quotes removed."""
    values: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("export "):
            line = line[len("export ") :].lstrip()
        key, sep, value = line.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not _KEY.match(key):
            raise CliError(f"{source}:{number}: not a KEY=VALUE line")
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        elif " #" in value:
            value = value.split(" #", 1)[0].rstrip()
        values[key] = value
    return values


def _redact(pair: str) -> str:
    return pair if len(pair) <= 3 else pair[:3] + "…"


@app.command()
def create(
    name: Annotated[str, typer.Argument(help="The secret's name, e.g. hf-prod.")],
    pairs: Annotated[list[str] | None, typer.Argument(metavar="KEY=VALUE...", help="Env vars the secret sets.")] = None,
    from_dotenv: Annotated[
        Path | None, typer.Option("--from-dotenv", help="Read KEY=VALUE lines from this file (.env).")
    ] = None,
    env: EnvOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Create or replace secret NAME; apps get its keys as env vars via `df.Secret.from_name(NAME)`.

    ```
    duanflow secret create hf-prod HF_TOKEN=hf_xxx
    duanflow secret create api-keys --from-dotenv .env
    ```
    """
    with errors_handled():
        values: dict[str, str] = {}
        if from_dotenv is not None:
            try:
                text = from_dotenv.expanduser().read_text()
            except OSError as exc:
                raise CliError(f"cannot read {from_dotenv}: {exc}") from None
            values.update(parse_dotenv(text, str(from_dotenv)))
        values.update(parse_pairs(pairs or []))
        if not values:
            raise CliError("give at least one KEY=VALUE (or --from-dotenv FILE)")
        client = get_client()
        env = env or client.env
        info = client.run(
            client.request,
            subjects.API_SECRET_CREATE,
            SecretCreateRequest(name=name, env=env, values=values),
            SecretInfo,
        )
        if json_out:
            out.print_json(data={"name": info.name, "env": info.env, "keys": info.keys})
            return
        out.print(
            f"Secret [bold]{escape(info.name)}[/bold] stored in env {escape(info.env)} "
            f"({', '.join(info.keys)}). Use it: df.App(..., secrets=[df.Secret.from_name({info.name!r})])"
        )


@app.command(name="list")
def list_(env: EnvOpt = None, json_out: JsonOpt = False) -> None:
    """List the secrets of an environment: names and their keys, never values.

    ```
    duanflow secret list
    ```
    """
    with errors_handled():
        client = get_client()
        env = env or client.env
        found = client.run(client.request, subjects.API_SECRET_LIST, SecretListRequest(env=env), SecretList)
        if json_out:
            rows = [{"name": s.name, "keys": s.keys, "updated_ms": s.updated_ms} for s in found.secrets]
            out.print_json(data={"env": env, "secrets": rows})
            return
        if not found.secrets:
            out.print(f"No secrets in env {escape(env)}. Create one: duanflow secret create NAME KEY=VALUE")
            return
        table = Table(title=f"secrets ({env})", title_justify="left")
        for col in ("name", "keys", "updated"):
            table.add_column(col)
        for s in found.secrets:
            when = datetime.fromtimestamp(s.updated_ms / 1000).strftime("%Y-%m-%d %H:%M:%S") if s.updated_ms else ""
            table.add_row(s.name, ", ".join(s.keys), when)
        out.print(table)


@app.command()
def delete(
    name: Annotated[str, typer.Argument(help="The secret's name.")],
    env: EnvOpt = None,
) -> None:
    """Delete secret NAME (running replicas keep their env; new deploys naming it fail).

    ```
    duanflow secret delete hf-prod
    ```
    """
    with errors_handled():
        client = get_client()
        env = env or client.env
        info = client.run(
            client.request, subjects.API_SECRET_DELETE, SecretDeleteRequest(name=name, env=env), SecretInfo
        )
        out.print(f"Deleted secret [bold]{escape(info.name)}[/bold] from env {escape(info.env)}.")

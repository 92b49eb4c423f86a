"""The ``duanflow`` command: ``dev`` (local stack), ``deploy`` and ``run``.

Results go to stdout (``--json`` where scripts need them), progress and errors to stderr. Every failure is
one red message and exit code 1, never a traceback (``DUANFLOW_DEBUG=1`` shows unexpected ones).
"""

from __future__ import annotations

import functools
import json
import warnings
from datetime import datetime
from importlib import metadata
from typing import Annotated, Any, NoReturn

import typer
from duanflow_proto import subjects
from duanflow_proto.messages.release import ReleaseList, ReleaseListRequest
from rich.json import JSON
from rich.markup import escape
from rich.table import Table

from duanflow._cli import apps, auth, dev, jobs, price, queue, secret
from duanflow._cli.deploy import DeployOutcome, Steps, app_spec, deploy, redeploy
from duanflow._cli.loader import Target, find_app, find_function, import_file
from duanflow._cli.logs import check_kind, parse_since, read_logs, show_line
from duanflow._cli.output import CliError, err, errors_handled, fail, out
from duanflow._cli.params import parse_args, signature_params
from duanflow._cli.progress import map_bars
from duanflow._client import get_client
from duanflow._errors import DuanFlowError
from duanflow._function import Function
from duanflow._map import show_progress

app = typer.Typer(
    name="duanflow",
    help=(
        "DuanFlow: Python functions on your own GPUs.\n\n"
        "Start a local stack with `duanflow dev up`, deploy an app file with `duanflow deploy app.py`, "
        "call a function with `duanflow run app.py::fn --param value`."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",
)
app.add_typer(dev.app, name="dev")
app.add_typer(auth.app, name="auth")
app.add_typer(secret.app, name="secret")
app.add_typer(price.app, name="price")
app.add_typer(queue.app, name="queue")
app.add_typer(jobs.app, name="jobs")

Env = Annotated[
    str | None,
    typer.Option(
        "--env",
        "-e",
        help="Environment to deploy to / call in [default: the profile's, usually main].",
        show_default=False,
    ),
]
Json = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout (progress stays on stderr).")]


def _version(value: bool) -> None:
    if value:
        try:
            version = metadata.version("duanflow")
        except metadata.PackageNotFoundError:
            version = "unknown"
        out.print(f"duanflow {version}")
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """DuanFlow: Python functions on your own GPUs."""


@app.command(name="deploy")
def deploy_cmd(
    file: Annotated[
        str,
        typer.Argument(metavar="FILE[::APP]", help="The app's Python file (and its App variable if it has several)."),
    ],
    env: Env = None,
    name: Annotated[
        str | None,
        typer.Option(
            "--name", "-n", help="Deploy the app under this name instead of the one in df.App(...).", show_default=False
        ),
    ] = None,
    json_out: Json = False,
) -> None:
    """Deploy an app: bundle the `*.py` files beside FILE, build its image, create and activate an immutable release.

    The release's replicas are started before this returns, so the functions answer right away:

    ```
    duanflow deploy examples/hello.py --env main
    ```
    """
    with errors_handled():
        target = Target.parse(file)
        module = import_file(target.path)
        the_app = find_app(module, target.path, var=target.name)
        spec = app_spec(the_app, module.__name__, name or "")
        env = env or get_client().env
        steps = Steps()
        steps.note(f"Deploying [bold]{escape(spec.name)}[/bold] from {escape(str(target.path))} to env {escape(env)}")
        outcome = deploy(target.path, spec, env=env, steps=steps)
        if json_out:
            out.print_json(data=outcome.to_dict(), ensure_ascii=False)
        else:
            _print_release(outcome)


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def run(
    ctx: typer.Context,
    target: Annotated[
        str,
        typer.Argument(
            metavar="FILE::FUNCTION", help="The app file and the function to call: app.py::classify_ticket."
        ),
    ],
    env: Env = None,
    json_out: Json = False,
) -> None:
    """Call FUNCTION of FILE on a replica and print its result; its parameters are options: `--text "hi"`.

    Like `modal run`, this runs the file as it is now: the app is deployed first (the same path as
    `duanflow deploy`, skipped when the active release already runs these exact sources, image and
    options), then the function is called with `.remote()` and the result printed: strings as they are,
    anything else as JSON. Options come from the function's signature: `def f(text, n: int = 3)` takes
    `--text TEXT --n 3`; booleans are `--flag/--no-flag`; lists and dicts are JSON.

    ```
    duanflow run examples/hello.py::classify_ticket --text "我的模型接口超时了"
    ```
    """
    with errors_handled():
        parsed = Target.parse(target)
        if not parsed.name:
            raise CliError(f"name the function to run: {parsed.path}::FUNCTION")
        module = import_file(parsed.path)
        the_app, fn = find_function(module, parsed.path, parsed.name)
        raw = fn.raw_f if isinstance(fn, Function) else fn
        kwargs = parse_args(signature_params(raw), ctx.args, parsed.name)
        spec = app_spec(the_app, module.__name__)
        env = env or get_client().env
        steps = Steps(quiet=json_out)
        outcome = deploy(parsed.path, spec, env=env, steps=steps, reuse_unchanged=True)
        for message in outcome.messages:
            steps.note(f"[dim]  {escape(message)}[/dim]")
        if not isinstance(fn, Function):  # @app.local_entrypoint(): runs here; its maps draw progress bars
            client = get_client()
            client.use_env(env)  # the entrypoint's calls go to the env just deployed
            with show_progress(map_bars(err)):
                result = fn(**kwargs)
            if result is not None:
                _print_result(result, json_out=json_out)
            return
        handle = Function.from_name(spec.name, fn.name, env=env)
        with steps.step(f"Running {fn.name} on a replica") as step:
            try:
                result = handle.remote(**kwargs)
            except DuanFlowError:
                raise
            except Exception as exc:  # the function itself raised: show its error and remote traceback
                _fail_remote(fn.name, exc)
            step.finish(f"{fn.name} returned")
        _print_result(result, json_out=json_out)


@app.command()
def releases(
    app_name: Annotated[str, typer.Argument(metavar="APP", help="The app's name, as in df.App(...).")],
    env: Env = None,
    json_out: Json = False,
) -> None:
    """List the releases of APP, newest first; the active one is marked.

    ```
    duanflow releases customer-ai-api
    ```
    """
    with errors_handled():
        client = get_client()
        env = env or client.env
        found = client.run(
            client.request, subjects.API_RELEASES, ReleaseListRequest(app=app_name, env=env), ReleaseList
        )
        if json_out:
            rows = [
                {
                    "release": r.release_id,
                    "active": r.active,
                    "created_ms": r.created_ms,
                    "image_id": r.image_id,
                    "bundle_digest": r.bundle_digest,
                    "functions": [f.name for f in r.spec.functions],
                }
                for r in found.releases
            ]
            out.print_json(data={"app": app_name, "env": env, "releases": rows})
            return
        if not found.releases:
            raise CliError(
                f"app {app_name!r} has no releases in env {env!r}", hint="deploy it with `duanflow deploy FILE`"
            )
        table = Table(title=f"{app_name} ({env})", title_justify="left")
        table.add_column("release", no_wrap=True)
        table.add_column("created", no_wrap=True)
        table.add_column("active", no_wrap=True)
        table.add_column("functions", overflow="fold")
        for r in found.releases:
            created = datetime.fromtimestamp(r.created_ms / 1000).strftime("%Y-%m-%d %H:%M:%S")
            active = "[green]● active[/green]" if r.active else ""
            table.add_row(r.release_id, created, active, ", ".join(f.name for f in r.spec.functions))
        out.print(table)


@app.command()
def rollback(
    app_name: Annotated[str, typer.Argument(metavar="APP", help="The app's name, as in df.App(...).")],
    to: Annotated[str, typer.Option("--to", help="The release to go back to (see `duanflow releases APP`).")],
    env: Env = None,
    json_out: Json = False,
) -> None:
    """Make an earlier release of APP active again: its own sources, image and options.

    Releases are immutable, so a rollback re-activates the chosen release itself: its replicas start, then
    the current release's drain. Nothing is built or uploaded.

    ```
    duanflow rollback customer-ai-api --to rel_20260505_1842
    ```
    """
    with errors_handled():
        client = get_client()
        env = env or client.env
        found = client.run(
            client.request, subjects.API_RELEASES, ReleaseListRequest(app=app_name, env=env), ReleaseList
        )
        target = next((r for r in found.releases if r.release_id == to), None)
        if target is None:
            known = ", ".join(r.release_id for r in found.releases[:10]) or "none"
            raise CliError(f"app {app_name!r} has no release {to!r} in env {env!r}", hint=f"its releases: {known}")
        if target.active:
            raise CliError(f"{to} is already the active release of {app_name} in {env}")
        steps = Steps(quiet=json_out)
        outcome = redeploy(target, env=env, steps=steps, client=client)
        if json_out:
            out.print_json(data={**outcome.to_dict(), "rolled_back_to": to}, ensure_ascii=False)
        else:
            _print_release(outcome)
            out.print(f"{app_name} is back on {outcome.release.release_id}.")


@app.command()
def logs(
    app_name: Annotated[str, typer.Argument(metavar="APP", help="The app's name, as in df.App(...).")],
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing new lines until Ctrl-C.")] = False,
    kind: Annotated[
        str | None,
        typer.Option("--kind", "-k", help="Only build, runtime, request or scheduler lines.", show_default=False),
    ] = None,
    since: Annotated[
        str | None,
        typer.Option(
            "--since", help="Start this long ago (30m, 2h, 7d) or at a time (2026-05-05T18:42).", show_default=False
        ),
    ] = None,
    until: Annotated[
        str | None,
        typer.Option("--until", help="Stop at this time (or this long ago: 10m).", show_default=False),
    ] = None,
    function: Annotated[
        str | None, typer.Option("--function", help="Only lines of this function.", show_default=False)
    ] = None,
    search: Annotated[
        str | None,
        typer.Option("--search", help="Only lines containing this text (case-insensitive).", show_default=False),
    ] = None,
    env: Env = None,
    json_out: Annotated[bool, typer.Option("--json", help="One JSON object per line.")] = False,
) -> None:
    """Print the log lines of APP: builds, replica output, requests and scheduler decisions.

    ```
    duanflow logs customer-ai-api --follow
    duanflow logs customer-ai-api --kind scheduler --since 30m
    duanflow logs customer-ai-api --since 7d --function chat --search timeout
    ```
    """
    with errors_handled():
        check_kind(kind)
        start = parse_since(since) if since else None
        end = parse_since(until, option="--until") if until else None
        if start and end and end < start:
            raise CliError(f"--until {until!r} is before --since {since!r}")
        client = get_client()
        env = env or client.env
        try:
            subjects.token(app_name)
        except ValueError as exc:
            raise CliError(f"app name {app_name!r}: {exc}") from None
        show = show_line(json_out=json_out)
        read = functools.partial(
            read_logs,
            client,
            env=env,
            app=app_name,
            kind=kind,
            since=start,
            until=end,
            function=function,
            search=search,
            follow=follow,
            show=show,
        )
        count = client.run(read)
        if not count and not json_out:
            what = f"{kind} lines" if kind else "log lines"
            err.print(f"No {what} for {app_name} in env {env}" + (f" since {since}" if since else "") + ".")


def _fail_remote(function: str, exc: Exception) -> NoReturn:
    notes = "\n".join(getattr(exc, "__notes__", ()) or ()).strip()
    fail(f"{function} raised {type(exc).__name__}: {exc}", hint=notes)


def _print_result(result: Any, *, json_out: bool) -> None:
    if json_out:
        out.print(json.dumps(result, ensure_ascii=False, default=repr), markup=False, highlight=False)
        return
    if isinstance(result, str):
        out.print(result, markup=False, highlight=False)
        return
    try:
        text = json.dumps(result, ensure_ascii=False)
    except (TypeError, ValueError):
        out.print(repr(result), markup=False, highlight=False)
        return
    out.print(JSON(text, ensure_ascii=False))


def _print_release(outcome: DeployOutcome) -> None:
    rel = outcome.release
    table = Table(title=f"{rel.app} {rel.release_id} ({rel.env})", title_justify="left")
    for col in ("function", "kind", "gpu", "keep warm", "timeout"):
        table.add_column(col)
    for f in rel.spec.functions:
        gpu = ", ".join(f.gpu) + (f" x{f.gpu_count}" if f.gpu and f.gpu_count > 1 else "") if f.gpu else "cpu"
        table.add_row(f.name, f.kind, gpu, str(f.keep_warm), f"{f.timeout_s:g}s")
    out.print(table)
    for message in outcome.messages:
        err.print(f"[dim]  {escape(message)}[/dim]")
    first = rel.spec.functions[0].name
    out.print(
        f"Deployed [bold]{escape(rel.app)}[/bold] as release [bold]{rel.release_id}[/bold]. "
        f"Call it: `duanflow run FILE::{first} ...` or "
        f"`df.Function.from_name({rel.app!r}, {first!r}).remote(...)`"
    )


apps.register(app)


def main() -> None:
    """Entry point of the ``duanflow`` console script."""
    # platformdirs warns on hosts without XDG_RUNTIME_DIR (containers); it is noise to a CLI user
    warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")
    try:
        app()
    except KeyboardInterrupt:
        err.print("interrupted")
        raise SystemExit(130) from None


__all__ = ["app", "main"]

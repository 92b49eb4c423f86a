"""``duanflow deploy``: import the app file, bundle its sources, upload them, build the image, create a release.

The steps follow ``docs/CONTRACTS.md`` (Deploy): ``UploadUrlRequest`` → HTTP PUT (skipped when the bundle is
stored already) → ``BuildRequest`` → ``DeployRequest``. ``duanflow run`` uses the same path.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import msgspec
from duanflow_proto import codec, subjects
from duanflow_proto.messages.build import BuildRequest, BuildResult
from duanflow_proto.messages.logs import LogLine
from duanflow_proto.messages.release import (
    AppSpec,
    DeployReply,
    DeployRequest,
    Release,
    ReleaseList,
    ReleaseListRequest,
    UploadUrlReply,
    UploadUrlRequest,
)
from nats.js.api import DeliverPolicy
from rich.markup import escape
from rich.status import Status

from duanflow._app import App
from duanflow._cli.bundle import Bundle, make_bundle
from duanflow._cli.output import CliError, err
from duanflow._client import Client, get_client
from duanflow._errors import BuildFailedError

T = TypeVar("T")

UPLOAD_TIMEOUT_S = 120.0
BUILD_TIMEOUT_S = 1800.0
"""A first build installs packages: give it long."""
LOG_FOLLOW_SETUP_S = 3.0
DEPLOY_TIMEOUT_S = 600.0
"""The router answers once the release's replicas are ready (model loading included)."""


@dataclass
class DeployOutcome:
    """What a deploy did."""

    release: Release
    image: BuildResult
    bundle: Bundle
    uploaded: bool
    deployed: bool = True
    """False when ``run`` found the same sources, image and spec already active."""
    replicas: list[str] = field(default_factory=list)
    messages: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON form (``--json``)."""
        rel = self.release
        return {
            "release": rel.release_id,
            "app": rel.app,
            "env": rel.env,
            "deployed": self.deployed,
            "image_id": rel.image_id,
            "image_status": self.image.status,
            "bundle_digest": rel.bundle_digest,
            "bundle_uploaded": self.uploaded,
            "functions": [
                {"name": f.name, "kind": f.kind, "gpu": f.gpu, "subject": subjects.invocation(rel.env, rel.app, f.name)}
                for f in rel.spec.functions
            ],
            "replicas": self.replicas,
            "messages": self.messages,
        }


class Step:
    """One running step: ``update`` changes the spinner's text, ``finish`` sets the line printed when done."""

    def __init__(self, doing: str, status: Status | None) -> None:
        self.doing = doing
        self.line = doing
        self._status = status

    def update(self, text: str) -> None:
        """Show ``text`` (a live log line) beside the spinner."""
        if self._status is not None:
            short = text if len(text) <= 100 else text[:97] + "..."
            self._status.update(f"{escape(self.doing)}… [dim]{escape(short)}[/dim]")

    def finish(self, line: str) -> None:
        """The line printed with ``✓`` when the step ends."""
        self.line = line


class Steps:
    """Rich progress on stderr: a spinner while a step runs (with its latest log line), then ``✓ what happened``."""

    def __init__(self, *, quiet: bool = False) -> None:
        self.quiet = quiet

    @contextlib.contextmanager
    def step(self, doing: str) -> Iterator[Step]:
        """Spin with ``doing…`` while the body runs, then print the step's line."""
        started = time.monotonic()
        if self.quiet:
            yield Step(doing, None)
            return
        with err.status(f"{escape(doing)}…", spinner="dots") as status:
            step = Step(doing, status)
            yield step
        secs = time.monotonic() - started
        took = f" [dim]({secs:.1f}s)[/dim]" if secs >= 0.5 else ""
        err.print(f"[green]✓[/green] {escape(step.line)}{took}")

    def note(self, text: str) -> None:
        """A plain progress line (rich markup)."""
        if not self.quiet:
            err.print(text)


def app_spec(app: App, module: str, name: str = "") -> AppSpec:
    """The app's spec with its module; ``name`` renames the app for this deploy."""
    spec = app.build_spec(module=module)
    if name and name != spec.name:
        try:
            spec = msgspec.structs.replace(spec, name=subjects.token(name))
        except ValueError as exc:
            raise CliError(f"--name {name!r}: {exc}") from None
    if not spec.functions:
        raise CliError(
            f"app {spec.name!r} declares no functions: nothing to deploy",
            hint="decorate a function with @app.function(...)",
        )
    return spec


def deploy(
    app_file: Path,
    spec: AppSpec,
    *,
    env: str,
    steps: Steps,
    client: Client | None = None,
    reuse_unchanged: bool = False,
) -> DeployOutcome:
    """Upload, build and deploy ``spec`` with the sources beside ``app_file``.

    ``reuse_unchanged``: when the active release of the app already runs these sources, image and spec,
    keep it instead of creating a new release (``duanflow run``).
    """
    client = client or get_client()
    with steps.step("Bundling sources") as step:
        bundle = make_bundle(app_file)
        step.finish(f"Bundled {len(bundle.files)} file(s), {_size(bundle.size)} (sha256 {bundle.digest[:12]})")
    with steps.step("Uploading the bundle") as step:
        ticket = client.run(
            client.request,
            subjects.API_BUNDLE_UPLOAD,
            UploadUrlRequest(digest=bundle.digest, size=bundle.size),
            UploadUrlReply,
            UPLOAD_TIMEOUT_S,
        )
        if not ticket.exists:
            _put(ticket.url, bundle.data)
        step.finish("Bundle already stored" if ticket.exists else f"Uploaded the bundle to {ticket.key}")
    with steps.step(f"Building the image of {spec.name}") as step:
        image = client.run(
            _request_following_logs,
            client,
            _LogFollow(env, spec.name, "build", step.update),
            subjects.BUILD_START,
            BuildRequest(spec=spec.image, app=spec.name, env=env),
            BuildResult,
            BUILD_TIMEOUT_S,
        )
        if image.status == "failed":
            tail = image.log_tail.rstrip()
            raise BuildFailedError(
                f"the image of {spec.name} failed to build ({image.image_id})" + (f":\n{tail}" if tail else "")
            )
        step.finish(f"Image {image.image_id} {image.status}")
    if reuse_unchanged:
        active = _active_release(client, spec.name, env)
        if (
            active is not None
            and active.bundle_digest == bundle.digest
            and active.image_id == image.image_id
            and active.spec == spec
        ):
            steps.note(f"[green]✓[/green] {spec.name} is deployed unchanged as {active.release_id} ({env})")
            return DeployOutcome(release=active, image=image, bundle=bundle, uploaded=not ticket.exists, deployed=False)
    fn_names = ", ".join(f.name for f in spec.functions)
    with steps.step(f"Deploying {spec.name} to {env} and starting replicas ({fn_names})") as step:
        reply = client.run(
            _request_following_logs,
            client,
            _LogFollow(env, spec.name, None, step.update),
            subjects.API_DEPLOY,
            DeployRequest(
                spec=spec, env=env, bundle_key=ticket.key, bundle_digest=bundle.digest, image_id=image.image_id
            ),
            DeployReply,
            DEPLOY_TIMEOUT_S,
        )
        step.finish(f"Release {reply.release.release_id} of {spec.name} is active in {env}")
    client.forget(spec.name, env)
    return DeployOutcome(
        release=reply.release,
        image=image,
        bundle=bundle,
        uploaded=not ticket.exists,
        replicas=list(reply.replicas),
        messages=list(reply.messages),
    )


def redeploy(old: Release, *, env: str, steps: Steps, client: Client | None = None) -> DeployOutcome:
    """Deploy an earlier release's exact content (spec, bundle, image) again as a new active release."""
    client = client or get_client()
    spec = old.spec
    with steps.step(f"Re-activating {spec.name} {old.release_id} and starting its replicas") as step:
        reply = client.run(
            _request_following_logs,
            client,
            _LogFollow(env, spec.name, None, step.update),
            subjects.API_DEPLOY,
            DeployRequest(
                spec=spec,
                env=env,
                bundle_key=old.bundle_key,
                bundle_digest=old.bundle_digest,
                image_id=old.image_id,
                activate_release=old.release_id,
            ),
            DeployReply,
            DEPLOY_TIMEOUT_S,
        )
        step.finish(f"Release {reply.release.release_id} of {spec.name} is active again in {env} (nothing built)")
    client.forget(spec.name, env)
    image = BuildResult(image_id=old.image_id, status="cached")
    bundle = Bundle(data=b"", digest=old.bundle_digest, files=())
    return DeployOutcome(
        release=reply.release,
        image=image,
        bundle=bundle,
        uploaded=False,
        replicas=list(reply.replicas),
        messages=list(reply.messages),
    )


@dataclass(frozen=True)
class _LogFollow:
    """Which log lines to show while a request runs."""

    env: str
    app: str
    kind: str | None
    show: Callable[[str], None]


async def _request_following_logs(
    client: Client, follow: _LogFollow, subject: str, message: msgspec.Struct, reply_type: type[T], wait_s: float
) -> T:
    """``client.request(...)`` while the app's log lines (build output, scheduler decisions) show as they come.

    Following is best effort: a stack that cannot stream logs still answers the request.
    """
    nc = await client.connect()
    sub: Any = None

    async def on_line(msg: Any) -> None:
        with contextlib.suppress(Exception):
            line = codec.decode(msg.data, LogLine)
            follow.show(f"{line.source}: {line.message}" if line.kind != "build" else line.message)

    with contextlib.suppress(Exception):
        sub = await asyncio.wait_for(
            nc.jetstream().subscribe(
                subjects.logs_filter(follow.env, follow.app, follow.kind),
                stream=subjects.STREAM_LOGS,
                ordered_consumer=True,
                deliver_policy=DeliverPolicy.NEW,
                cb=on_line,
            ),
            LOG_FOLLOW_SETUP_S,
        )
    try:
        return await client.request(subject, message, reply_type, wait_s)
    finally:
        if sub is not None:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()


def _active_release(client: Client, app: str, env: str) -> Release | None:
    """The app's active release, or None (also when the router cannot say)."""
    try:
        found = client.run(client.request, subjects.API_RELEASES, ReleaseListRequest(app=app, env=env), ReleaseList)
    except Exception:
        return None
    return next((r for r in found.releases if r.active), None)


def _put(url: str, data: bytes) -> None:
    req = urllib.request.Request(url, data=data, method="PUT", headers={"Content-Type": "application/zip"})  # noqa: S310
    try:
        with urllib.request.urlopen(req, timeout=UPLOAD_TIMEOUT_S) as resp:  # noqa: S310
            resp.read()
    except urllib.error.HTTPError as exc:
        body = exc.read()[:300].decode(errors="replace")
        raise CliError(f"uploading the bundle failed: HTTP {exc.code} {exc.reason}: {body}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise CliError(f"uploading the bundle failed: cannot reach {url.split('?')[0]}: {reason}") from None


def _size(n: int) -> str:
    return f"{n} B" if n < 1024 else f"{n / 1024:.1f} KiB" if n < 1024 * 1024 else f"{n / 2**20:.1f} MiB"

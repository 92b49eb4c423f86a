"""App specs, deploys, releases and the gateway's route table."""

from __future__ import annotations

import hashlib
import hmac

import msgspec

from duanflow_proto.messages.build import ImageSpec
from duanflow_proto.messages.jobs import JobSpec


class EndpointSpec(msgspec.Struct, frozen=True, kw_only=True, tag="duanflow.v1.release.endpoint", tag_field="type"):
    """HTTP exposure of a function."""

    method: str = "POST"
    """HTTP method."""
    path: str = "/"
    """Path, with ``{param}`` placeholders."""
    auth_secret: str | None = None
    """Name of the env var / secret key holding the bearer token (None: public)."""
    max_concurrency: int = 0
    """Burst limit: concurrent requests (0: unlimited)."""
    stream: str = "auto"
    """Streaming mode for generators: ``auto``, ``chunked`` or ``sse``."""


class FunctionSpec(msgspec.Struct, frozen=True, kw_only=True, tag="duanflow.v1.release.function", tag_field="type"):
    """One function of an app and its resource request."""

    name: str
    """Function name (Python qualname for methods: ``Model.predict``)."""
    kind: str = "function"
    """``function``, ``endpoint``, ``worker``, ``job`` or ``cls``."""
    gpu: list[str] = []
    """Acceptable GPU types in order of preference (empty: CPU only)."""
    gpu_count: int = 1
    """GPUs per replica (when ``gpu`` is set)."""
    gpu_memory_mb: int = 0
    """GPU memory floor per GPU, MiB."""
    memory_exact: bool = False
    """True when the memory spec was exact (``80Gi``) rather than a floor (``48Gi+``)."""
    gpu_memory_max_mb: int = 0
    """Upper bound of nominal GPU memory per GPU, MiB, for ranges such as ``24GB..80GB`` (0: none)."""
    timeout_s: float = 300.0
    """Per-input timeout."""
    concurrency: int = 1
    """Inputs in flight per replica."""
    keep_warm: int = 0
    """Replicas kept ready at all times."""
    scale_to: int = 1
    """Maximum replicas."""
    region: list[str] = []
    """Acceptable regions (empty: any)."""
    optimize: str = "latency"
    """``latency`` or ``price``."""
    max_price: float | None = None
    """Price cap in $/GPU-hour."""
    retries: int = 0
    """Retries after a failed attempt."""
    retry_backoff: float = 2.0
    """Multiplier of the delay between successive retries."""
    retry_initial_delay_s: float = 1.0
    """Delay before the first retry."""
    retry_max_delay_s: float = 60.0
    """Upper bound of the delay between retries."""
    secrets: list[str] = []
    """Secrets injected into this function's replicas (on top of the app's)."""
    env: dict[str, str] = {}
    """Extra env vars for this function."""
    endpoint: EndpointSpec | None = None
    """HTTP exposure (endpoints only)."""
    queue: str | None = None
    """Queue name (workers only)."""
    is_generator: bool = False
    """True when the function yields."""
    job: JobSpec | None = None
    """Set for ``@app.job`` functions (one dedicated replica per run, none kept warm); None for the others."""


class AppSpec(msgspec.Struct, frozen=True, kw_only=True, tag="duanflow.v1.release.app", tag_field="type"):
    """The declarative spec of one app, as collected from the user's file."""

    name: str
    """App name."""
    module: str
    """Module name to import inside replicas."""
    functions: list[FunctionSpec] = []
    """Functions, endpoints, workers and jobs."""
    image: ImageSpec = ImageSpec()
    """Image to run in."""
    secrets: list[str] = []
    """Secret names injected as env vars."""
    env: dict[str, str] = {}
    """Plain env vars."""
    python: str = ""
    """Python ``major.minor`` of the deploying client."""


class UploadUrlRequest(
    msgspec.Struct, frozen=True, kw_only=True, tag="duanflow.v1.release.upload_url_request", tag_field="type"
):
    """Ask for a presigned URL to upload a source bundle."""

    digest: str
    """sha256 hex digest of the bundle."""
    size: int
    """Bundle size in bytes."""


class UploadUrlReply(msgspec.Struct, frozen=True, kw_only=True, tag="duanflow.v1.release.upload_url", tag_field="type"):
    """Where to PUT the bundle."""

    key: str
    """S3 key the bundle is stored under (content-addressed)."""
    url: str
    """Presigned PUT URL (empty when ``exists``)."""
    exists: bool = False
    """True when that bundle is already stored: nothing to upload."""


class DeployRequest(msgspec.Struct, frozen=True, kw_only=True, tag="duanflow.v1.release.deploy", tag_field="type"):
    """Create an immutable release and activate it."""

    spec: AppSpec
    """The app's spec."""
    env: str = "main"
    """Environment."""
    bundle_key: str
    """S3 key of the uploaded bundle."""
    bundle_digest: str
    """sha256 of the bundle."""
    image_id: str = ""
    """Image built for the app by the builder (empty: the agent's own environment)."""
    activate_release: str = ""
    """Roll back: make this stored release of the app active again (its own spec, bundle and image; no new release)."""


class Release(msgspec.Struct, frozen=True, kw_only=True, tag="duanflow.v1.release.release", tag_field="type"):
    """An immutable release of an app."""

    release_id: str
    """``rel_YYYYMMDD_HHMM[_n]``."""
    app: str
    """App name."""
    env: str
    """Environment."""
    created_ms: int
    """Creation time (epoch ms)."""
    bundle_key: str
    """S3 key of the source bundle."""
    bundle_digest: str
    """sha256 of the bundle."""
    image_id: str
    """Image id."""
    spec: AppSpec
    """The app spec this release runs."""
    active: bool = False
    """True for the active release of its app and env."""


class DeployReply(msgspec.Struct, frozen=True, kw_only=True, tag="duanflow.v1.release.deploy_reply", tag_field="type"):
    """Result of a deploy."""

    release: Release
    """The new release."""
    replicas: list[str] = []
    """Replicas placed for it."""
    messages: list[str] = []
    """Notes for the user (scheduler decisions, simulated GPUs)."""


class ReleaseListRequest(
    msgspec.Struct, frozen=True, kw_only=True, tag="duanflow.v1.release.list_request", tag_field="type"
):
    """List releases of an app (or every app when ``app`` is empty)."""

    app: str = ""
    """App name."""
    env: str = "main"
    """Environment."""


class ReleaseList(msgspec.Struct, frozen=True, kw_only=True, tag="duanflow.v1.release.list", tag_field="type"):
    """Releases, newest first."""

    releases: list[Release] = []
    """The releases."""


class FunctionLookup(
    msgspec.Struct, frozen=True, kw_only=True, tag="duanflow.v1.release.function_lookup", tag_field="type"
):
    """Resolve a deployed function by name."""

    app: str
    """App name."""
    function: str
    """Function name."""
    env: str = "main"
    """Environment."""


class FunctionRef(msgspec.Struct, frozen=True, kw_only=True, tag="duanflow.v1.release.function_ref", tag_field="type"):
    """A deployed function, as callers need it."""

    app: str
    """App name."""
    env: str
    """Environment."""
    release: str
    """Active release id."""
    spec: FunctionSpec
    """The function's spec."""
    subject: str
    """Subject to publish invocations on."""


class RouteEntry(msgspec.Struct, frozen=True, kw_only=True, tag="duanflow.v1.release.route", tag_field="type"):
    """One entry of the gateway's route table."""

    method: str
    """HTTP method."""
    path: str
    """Path template."""
    env: str
    """Environment."""
    app: str
    """App name."""
    function: str
    """Function name."""
    release: str
    """Release id."""
    subject: str
    """Invocation subject."""
    endpoint: EndpointSpec
    """Endpoint options (auth, burst limit, streaming)."""
    timeout_s: float = 300.0
    """Deadline for one request."""
    auth_salt: str = ""
    """Hex salt of :attr:`auth_digest` (bearer-auth endpoints)."""
    auth_digest: str = ""
    """``bearer_digest(auth_salt, token)`` of the expected bearer token; never the token itself."""


def bearer_digest(salt_hex: str, token: str) -> str:
    """The digest of a bearer token that route entries carry instead of the token: HMAC-SHA256 keyed by the salt.

    >>> bearer_digest("00", "secret")[:16]
    '1810e8d341b9e61e'
    """
    return hmac.new(bytes.fromhex(salt_hex), token.encode(), hashlib.sha256).hexdigest()


class AppStopRequest(
    msgspec.Struct, frozen=True, kw_only=True, tag="duanflow.v1.release.stop_request", tag_field="type"
):
    """Stop an app: deactivate its release, remove its routes, drain and stop its replicas."""

    app: str
    """App name."""
    env: str = "main"
    """Environment."""


class AppStopReply(msgspec.Struct, frozen=True, kw_only=True, tag="duanflow.v1.release.stop_reply", tag_field="type"):
    """What stopping an app did."""

    app: str
    """App name."""
    env: str = "main"
    """Environment."""
    release: str = ""
    """The release that was active ("" when none was)."""
    replicas: list[str] = []
    """Replicas stopped."""

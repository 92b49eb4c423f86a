"""Image specs and builds."""

from __future__ import annotations

import msgspec


class ImageSpec(msgspec.Struct, frozen=True, kw_only=True, tag="duanflow.v1.build.image_spec", tag_field="type"):
    """Canonical image spec; its hash is the image id."""

    base: str = "debian_slim"
    """``debian_slim`` or ``cuda``."""
    cuda: str | None = None
    """CUDA version for ``cuda`` bases."""
    python: str = ""
    """Python ``major.minor`` (empty: the caller's)."""
    pip: list[str] = []
    """pip requirements, in order."""
    apt: list[str] = []
    """Debian packages (docker runtime only)."""
    commands: list[str] = []
    """Shell commands run at build time (docker runtime only)."""
    env: dict[str, str] = {}
    """Environment baked into the image."""
    workdir: str | None = None
    """Working directory."""


class BuildRequest(msgspec.Struct, frozen=True, kw_only=True, tag="duanflow.v1.build.request", tag_field="type"):
    """Ask the builder for an image."""

    spec: ImageSpec
    """What to build."""
    app: str = ""
    """App asking (for build logs)."""
    env: str = "main"
    """Environment asking."""
    backend: str = "venv"
    """``venv`` (process runtime) or ``docker``."""


class BuildResult(msgspec.Struct, frozen=True, kw_only=True, tag="duanflow.v1.build.result", tag_field="type"):
    """The builder's answer."""

    image_id: str
    """Content hash of the canonical spec (``im-...``)."""
    status: str
    """``cached``, ``built`` or ``failed``."""
    backend: str = "venv"
    """Backend that built it."""
    artifact: str = ""
    """Where the image lives (S3 key, registry ref, or empty for the agent's own environment)."""
    log_tail: str = ""
    """Last lines of the build log (on failure)."""
    duration_ms: int = 0
    """Build time."""


def image_artifact_key(image_id: str) -> str:
    """S3 key of a packed venv image (the builder writes it, the router presigns it for agents).

    >>> image_artifact_key("im-0123")
    'images/im-0123.tar.gz'
    """
    return f"images/{image_id}.tar.gz"


DOCKER_REPOSITORY = "duanflow/images"
"""Registry repository of every docker image; the tag is the image id."""


def docker_image_ref(registry: str, image_id: str) -> str:
    """Registry reference of a docker-built image (the builder pushes it, agents pull it).

    >>> docker_image_ref("127.0.0.1:5000", "im-0123")
    '127.0.0.1:5000/duanflow/images:im-0123'
    """
    return f"{registry.rstrip('/')}/{DOCKER_REPOSITORY}:{image_id}"


def needs_docker(spec: ImageSpec) -> bool:
    """Whether only the docker backend builds ``spec`` as asked: Debian packages, build commands or a CUDA base.

    >>> needs_docker(ImageSpec(apt=["git"])), needs_docker(ImageSpec(pip=["numpy"]))
    (True, False)
    """
    return bool(spec.apt or spec.commands) or spec.base == "cuda"

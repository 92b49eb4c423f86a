"""Settings of the builder service, from ``DUANFLOW_BUILDER_*`` environment variables."""

from __future__ import annotations

from duanflow_kit.settings import BaseSettings, load_settings

PREFIX = "DUANFLOW_BUILDER_"


class Settings(BaseSettings, frozen=True, kw_only=True):
    """Typed settings of the builder service."""

    database_url: str
    """Postgres DSN (``postgresql://user@host:port/db``); the service owns schema ``builder``."""
    s3_endpoint: str
    """S3 endpoint ``host:port`` (MinIO, SeaweedFS or any S3 server)."""
    s3_access_key: str
    """S3 access key."""
    s3_secret_key: str
    """S3 secret key."""
    s3_bucket: str = "duanflow"
    """Bucket for bundles, images, payloads and archives."""
    s3_secure: bool = False
    """Use HTTPS to reach S3."""
    s3_public_endpoint: str = ""
    """Endpoint clients use in presigned URLs (default: ``s3_endpoint``)."""
    schema: str = "builder"
    """Postgres schema this service owns."""
    work_dir: str = ""
    """Directory for build trees (default: the system temp dir)."""
    build_timeout_s: float = 900.0
    """Longest one build may take before it is failed."""
    max_concurrent_builds: int = 4
    """Build requests handled at once by this instance."""
    stale_build_s: float = 3600.0
    """A ``building`` row older than this (a crashed builder) may be built again."""
    docker_host: str = ""
    """Docker engine of the docker backend (``unix:///run/docker.sock``); empty: no docker backend, and specs
    that need one (``apt_install``, ``run_commands``) are refused."""
    docker_registry: str = ""
    """The stack's registry (``host:port``) docker images are pushed to and agents pull from."""
    docker_base_image: str = ""
    """Replaces every Dockerfile's ``FROM`` (offline hosts: a local base with Python and the DuanFlow SDK)."""
    docker_uv_image: str = "ghcr.io/astral-sh/uv:0.5"
    """Image the ``uv`` binary is copied from when an image has pip packages."""


def load() -> Settings:
    """Settings from the environment."""
    return load_settings(Settings, PREFIX)

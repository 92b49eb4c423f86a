"""Settings of the router service, from ``DUANFLOW_ROUTER_*`` environment variables."""

from __future__ import annotations

from duanflow_kit.settings import BaseSettings, load_settings

PREFIX = "DUANFLOW_ROUTER_"


class Settings(BaseSettings, frozen=True, kw_only=True):
    """Typed settings of the router service."""

    database_url: str
    """Postgres DSN (``postgresql://user@host:port/db``); the service owns schema ``router``."""
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
    schema: str = "router"
    """Postgres schema this service owns."""
    start_timeout_s: float = 180.0
    """Seconds to wait for an agent to report a replica ready (its download, image unpack and imports)."""
    capacity_wait_s: float = 60.0
    """Seconds a deploy waits, with backoff, for GPUs that fit but are all taken (``no_capacity``)."""
    tick_s: float = 1.0
    """Seconds between liveness sweeps (dead agents' replicas are re-placed) and lease renewals."""
    autoscale_interval_s: float = 0.5
    """Seconds between autoscaler passes (each reads the consumer of every function it may scale)."""
    idle_window_s: float = 60.0
    """Seconds without a new delivery after which replicas above ``keep_warm`` stop (to zero when it is 0)."""
    autoscale_max_starts: int = 8
    """Replicas the autoscaler starts at most per pass, over every function (bounds a burst of placements)."""
    queue_metrics_interval_s: float = 5.0
    """Seconds between reads of every consumer's depth for the queue gauges (only while ``metrics_port`` is set)."""
    docker_registry: str = ""
    """The stack's registry (``host:port``, the builder's ``DUANFLOW_BUILDER_DOCKER_REGISTRY``): replicas of an image
    only docker builds run from ``<registry>/duanflow/images:<image id>``. Empty: such deploys are refused."""
    secret_key: str = ""
    """Key that seals stored secrets (AES-256-GCM via HKDF; 32+ random characters). Empty: secrets are refused."""


def load() -> Settings:
    """Settings from the environment."""
    return load_settings(Settings, PREFIX)

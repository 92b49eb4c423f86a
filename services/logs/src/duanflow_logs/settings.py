"""Settings of the logs service, from ``DUANFLOW_LOGS_*`` environment variables."""

from __future__ import annotations

from duanflow_kit.settings import BaseSettings, load_settings
from duanflow_proto import subjects

PREFIX = "DUANFLOW_LOGS_"


class Settings(BaseSettings, frozen=True, kw_only=True):
    """Typed settings of the logs service."""

    database_url: str
    """Postgres DSN (``postgresql://user@host:port/db``); the service owns schema ``logs``."""
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
    schema: str = "logs"
    """Postgres schema this service owns."""
    consumer: str = subjects.CONSUMER_LOGS_ARCHIVER
    """Durable consumer on the logs stream; every instance of one deployment shares it."""
    filter_subject: str = subjects.LOGS_ALL
    """Log subjects this deployment stores."""
    batch_size: int = 256
    """Most lines taken from the stream and inserted at once."""
    max_query_lines: int = 10_000
    """Most lines one query may ask for."""
    archive_after_s: float = 23 * 3600.0
    """Lines older than this (whole hours) move from Postgres to S3 (the stream keeps a day)."""
    archive_interval_s: float = 300.0
    """How often the archiver looks for hours to move."""


def load() -> Settings:
    """Settings from the environment."""
    return load_settings(Settings, PREFIX)

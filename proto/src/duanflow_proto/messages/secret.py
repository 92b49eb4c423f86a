"""Secrets: named sets of env vars the router stores encrypted and injects into an app's replicas."""

from __future__ import annotations

import msgspec


class SecretCreateRequest(
    msgspec.Struct, frozen=True, kw_only=True, tag="duanflow.v1.secret.create_request", tag_field="type"
):
    """Create (or replace) one secret of an environment."""

    name: str
    """Secret name (``hf-prod``)."""
    env: str = "main"
    """Environment the secret belongs to."""
    values: dict[str, str] = {}
    """Env var name → value; never logged, stored encrypted."""
    replace: bool = True
    """Replace an existing secret of that name (False: a conflict error)."""


class SecretInfo(msgspec.Struct, frozen=True, kw_only=True, tag="duanflow.v1.secret.info", tag_field="type"):
    """What may be shown about a secret: its name and key names, never values."""

    name: str
    """Secret name."""
    env: str = "main"
    """Environment."""
    keys: list[str] = []
    """Env var names it sets."""
    created_ms: int = 0
    """First creation (epoch ms)."""
    updated_ms: int = 0
    """Last replacement (epoch ms)."""


class SecretListRequest(
    msgspec.Struct, frozen=True, kw_only=True, tag="duanflow.v1.secret.list_request", tag_field="type"
):
    """List the secrets of an environment."""

    env: str = "main"
    """Environment."""


class SecretList(msgspec.Struct, frozen=True, kw_only=True, tag="duanflow.v1.secret.list", tag_field="type"):
    """Secrets of an environment, by name."""

    secrets: list[SecretInfo] = []
    """The secrets (names and key names only)."""


class SecretDeleteRequest(
    msgspec.Struct, frozen=True, kw_only=True, tag="duanflow.v1.secret.delete_request", tag_field="type"
):
    """Delete one secret."""

    name: str
    """Secret name."""
    env: str = "main"
    """Environment."""

"""What the secrets use cases need from the outside world, as Protocols (adapters implement them)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


class UnsealError(Exception):
    """A sealed value cannot be opened (another key, or tampered with)."""


@dataclass(frozen=True)
class SealedValue:
    """An encrypted blob and what is needed to open it (besides the key)."""

    key_id: str
    nonce: bytes
    ciphertext: bytes


@dataclass(frozen=True)
class SecretRow:
    """One stored secret: names in clear, values sealed."""

    env: str
    name: str
    keys: tuple[str, ...]
    sealed: SealedValue
    created_ms: int = 0
    updated_ms: int = 0


class Sealer(Protocol):
    """Authenticated encryption bound to a context (AES-GCM)."""

    def seal(self, plaintext: bytes, context: bytes) -> SealedValue:
        """Encrypt ``plaintext`` bound to ``context``."""
        ...

    def unseal(self, sealed: SealedValue, context: bytes) -> bytes:
        """Decrypt, raising :class:`UnsealError` on a wrong key or tampering."""
        ...


class SecretStore(Protocol):
    """Durable secrets (Postgres)."""

    async def put(self, row: SecretRow, *, replace: bool) -> bool:
        """Insert or (``replace``) overwrite; False when it exists and ``replace`` is False."""
        ...

    async def get(self, env: str, names: list[str]) -> dict[str, SecretRow]:
        """The rows of ``names`` in ``env`` that exist, by name."""
        ...

    async def list(self, env: str) -> list[SecretRow]:
        """Every secret of ``env``, by name."""
        ...

    async def delete(self, env: str, name: str) -> SecretRow | None:
        """Remove one; the removed row or None."""
        ...

"""Secrets: named values stored by the platform and injected into replicas as env vars."""

from __future__ import annotations

from dataclasses import dataclass

from duanflow._errors import InvalidOptionError


@dataclass(frozen=True, slots=True)
class Secret:
    """A reference to a secret stored on the platform, injected into replicas as env vars.

    Example::

        app = df.App("customer-ai-api", secrets=[df.Secret.from_name("hf-prod")])
    """

    name: str

    @classmethod
    def from_name(cls, name: str) -> Secret:
        """Refer to a stored secret by its name.

        Example::

            hf = df.Secret.from_name("hf-prod")
        """
        if not isinstance(name, str) or not name.strip():
            raise InvalidOptionError(f"Secret.from_name() needs a non-empty name, got {name!r}")
        return cls(name.strip())


def secret_names(secrets: object, *, option: str = "secrets") -> list[str]:
    """Secret names from a list of :class:`Secret` or str (order kept, duplicates dropped)."""
    if secrets is None:
        return []
    if isinstance(secrets, (str, Secret)):
        secrets = [secrets]
    if not isinstance(secrets, (list, tuple)):
        raise InvalidOptionError(f"{option}= takes a list of df.Secret.from_name(...), got {type(secrets).__name__}")
    names: list[str] = []
    for item in secrets:
        if isinstance(item, Secret):
            name = item.name
        elif isinstance(item, str) and item.strip():
            name = item.strip()
        else:
            raise InvalidOptionError(f"{option}= takes df.Secret.from_name(...) or secret names, got {item!r}")
        if name not in names:
            names.append(name)
    return names

"""Profiles in ``$DUANFLOW_HOME/config.toml`` (default ``~/.duanflow``): where the SDK and CLI connect.

A profile holds the NATS URL and the *client* role's credentials, the default environment, and the
gateway URL. ``duanflow dev up`` writes the ``local`` profile; ``duanflow auth login`` writes others.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path

from duanflow_proto.errors import NotFoundError

LOCAL = "local"


def home() -> Path:
    """``$DUANFLOW_HOME`` or ``~/.duanflow``."""
    return Path(os.environ.get("DUANFLOW_HOME") or Path.home() / ".duanflow")


def config_path() -> Path:
    """Path of the config file."""
    return home() / "config.toml"


@dataclass
class Profile:
    """One place to connect to."""

    nats_url: str
    nats_user: str = ""
    nats_password: str = ""
    env: str = "main"
    gateway_url: str = ""
    s3_endpoint: str = ""
    extra: dict[str, str] = field(default_factory=dict)


def _quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def load_all() -> tuple[str, dict[str, Profile]]:
    """The active profile's name and every profile."""
    path = config_path()
    if not path.exists():
        return "", {}
    data = tomllib.loads(path.read_text())
    profiles: dict[str, Profile] = {}
    for name, raw in data.get("profiles", {}).items():
        known = {k: v for k, v in raw.items() if k in Profile.__dataclass_fields__ and k != "extra"}
        extra = {k: str(v) for k, v in raw.items() if k not in Profile.__dataclass_fields__}
        profiles[name] = Profile(**known, extra=extra)
    return str(data.get("active", "")), profiles


def save_profile(name: str, profile: Profile, *, activate: bool = True) -> Path:
    """Write (or replace) one profile; the file is created with mode 0600."""
    active, profiles = load_all()
    profiles[name] = profile
    if activate or not active:
        active = name
    lines = [f"active = {_quote(active)}", ""]
    for pname, prof in sorted(profiles.items()):
        lines.append(f"[profiles.{pname}]")
        values = asdict(prof)
        extra = values.pop("extra")
        for key, value in {**values, **extra}.items():
            lines.append(f"{key} = {_quote(str(value))}")
        lines.append("")
    path = config_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write("\n".join(lines))
    tmp.replace(path)
    path.chmod(0o600)
    return path


def remove_profile(name: str) -> None:
    """Delete one profile (no error when absent)."""
    active, profiles = load_all()
    if name not in profiles:
        return
    del profiles[name]
    path = config_path()
    if not profiles:
        path.unlink(missing_ok=True)
        return
    first = next(iter(sorted(profiles)))
    for pname, prof in profiles.items():
        save_profile(pname, prof, activate=(pname == (active if active != name else first)))


def current(name: str | None = None) -> Profile:
    """The profile to use: ``name``, else ``$DUANFLOW_PROFILE``, else the active one, else ``local``.

    ``DUANFLOW_NATS_URL`` (with ``DUANFLOW_NATS_USER`` / ``DUANFLOW_NATS_PASSWORD``) overrides the file,
    which is how replicas and tests connect.
    """
    url = os.environ.get("DUANFLOW_NATS_URL")
    if url and not name:
        return Profile(
            nats_url=url,
            nats_user=os.environ.get("DUANFLOW_NATS_USER", ""),
            nats_password=os.environ.get("DUANFLOW_NATS_PASSWORD", ""),
            env=os.environ.get("DUANFLOW_ENV", "main"),
            gateway_url=os.environ.get("DUANFLOW_GATEWAY_URL", ""),
        )
    active, profiles = load_all()
    wanted = name or os.environ.get("DUANFLOW_PROFILE") or active or LOCAL
    if not wanted or wanted not in profiles:
        which = f"no DuanFlow profile {wanted!r}" if wanted else "no DuanFlow profile"
        raise NotFoundError(
            f"{which} in {config_path()}: start a local stack with `duanflow dev up` "
            "or log in with `duanflow auth login --server URL --token TOKEN`"
        )
    return profiles[wanted]

"""Write the env file of the docker-compose stack (``make up``), with fresh random secrets, unless it exists.

The compose file reads every secret from this file (``${NAME:?...}``) and commits none; the file is created once,
readable by its owner only, and kept, so the stack's volumes stay usable across ``make down`` / ``make up``.

    python scripts/compose_env.py [PATH]      # default: $DUANFLOW_HOME/compose.env (~/.duanflow/compose.env)
    python scripts/compose_env.py --client    # print the env vars that point the SDK/CLI at the compose stack

Standard library only: it runs before the virtualenv exists.
"""

from __future__ import annotations

import argparse
import os
import secrets
import sys
from pathlib import Path

# Every variable docker-compose.yml requires (``${NAME:?...}``); tests/unit/test_compose.py keeps this in step.
SECRETS = (
    "DUANFLOW_NATS_CLIENT_PASSWORD",
    "DUANFLOW_NATS_AGENT_PASSWORD",
    "DUANFLOW_NATS_SERVICE_PASSWORD",
    "DUANFLOW_POSTGRES_PASSWORD",
    "DUANFLOW_S3_ACCESS_KEY",
    "DUANFLOW_S3_SECRET_KEY",
)


def default_path() -> Path:
    """``$DUANFLOW_HOME/compose.env`` (``DUANFLOW_HOME`` defaults to ``~/.duanflow``)."""
    home = os.environ.get("DUANFLOW_HOME") or str(Path.home() / ".duanflow")
    return Path(home) / "compose.env"


def render() -> str:
    """A new env file: one random value per secret (hex, so it is safe inside URLs and config files)."""
    lines = ["# DuanFlow docker-compose secrets, written by scripts/compose_env.py; keep this file private."]
    lines += [f"{name}={secrets.token_hex(24)}" for name in SECRETS]
    return "\n".join(lines) + "\n"


def read(path: Path) -> dict[str, str]:
    """``NAME=value`` pairs of an env file (comments and blank lines skipped)."""
    values: dict[str, str] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.lstrip().startswith("#") and "=" in line:
            name, value = line.split("=", 1)
            values[name.strip()] = value.strip()
    return values


def ensure(path: Path) -> bool:
    """Create ``path`` with fresh secrets when it does not exist; True when it was created."""
    if path.exists():
        missing = [name for name in SECRETS if name not in read(path)]
        if missing:
            raise SystemExit(f"{path} lacks {', '.join(missing)}: add them or delete the file to start afresh")
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(render())
    return True


def client_env(path: Path, nats_port: str = "4222") -> str:
    """Shell ``export`` lines that point the SDK and CLI at the compose stack as the ``client`` role."""
    values = read(path)
    return (
        f"export DUANFLOW_NATS_URL=nats://127.0.0.1:{nats_port}\n"
        "export DUANFLOW_NATS_USER=client\n"
        f"export DUANFLOW_NATS_PASSWORD={values['DUANFLOW_NATS_CLIENT_PASSWORD']}\n"
    )


def main(argv: list[str] | None = None) -> int:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("path", nargs="?", type=Path, default=None, help="env file (default: %(default)s)")
    parser.add_argument("--client", action="store_true", help="print the client's env vars instead")
    args = parser.parse_args(argv)
    path: Path = args.path or default_path()
    if args.client:
        if not path.exists():
            print(f"{path} does not exist: run `make up` first", file=sys.stderr)
            return 1
        print(client_env(path, os.environ.get("DUANFLOW_NATS_PORT", "4222")), end="")
        return 0
    if ensure(path):
        print(f"wrote {path} with fresh secrets", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

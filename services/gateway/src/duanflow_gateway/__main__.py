"""``python -m duanflow_gateway``: load settings from the environment and serve HTTP until SIGTERM."""

from __future__ import annotations

from duanflow_kit.service import main as run_main

from duanflow_gateway import settings
from duanflow_gateway.app import build_app


def main() -> None:
    """Run the gateway service."""
    run_main(build_app(settings.load()).run())


if __name__ == "__main__":
    main()

"""``python -m duanflow_router``: load settings from the environment and run the router until SIGTERM."""

from __future__ import annotations

from duanflow_kit.service import main as run_main

from duanflow_router import settings
from duanflow_router.app import build_app


def main() -> None:
    """Run the router service."""
    run_main(build_app(settings.load()).run())


if __name__ == "__main__":
    main()

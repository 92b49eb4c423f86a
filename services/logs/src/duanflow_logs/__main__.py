"""``python -m duanflow_logs``: load settings from the environment and run the log service until SIGTERM."""

from __future__ import annotations

from duanflow_kit.service import main as run_main

from duanflow_logs import settings
from duanflow_logs.app import build_app


def main() -> None:
    """Run the log service."""
    run_main(build_app(settings.load()).run())


if __name__ == "__main__":
    main()

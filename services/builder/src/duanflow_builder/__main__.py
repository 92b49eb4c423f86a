"""``python -m duanflow_builder``: load settings from the environment and run the builder until SIGTERM."""

from __future__ import annotations

from duanflow_kit.service import main as run_main

from duanflow_builder.app import build_app
from duanflow_builder.settings import load


def main() -> None:
    """Run the builder service."""
    run_main(build_app(load()).run())


if __name__ == "__main__":
    main()

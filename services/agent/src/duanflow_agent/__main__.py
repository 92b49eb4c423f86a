"""``python -m duanflow_agent``: run the host agent until SIGTERM."""

from __future__ import annotations

from duanflow_kit.service import main

from duanflow_agent.app import build_app
from duanflow_agent.settings import load


def run() -> None:
    """Build the agent from ``DUANFLOW_AGENT_*`` settings and run it."""
    main(build_app(load()).run())


if __name__ == "__main__":
    run()

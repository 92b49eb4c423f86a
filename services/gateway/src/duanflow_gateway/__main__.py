"""``python -m duanflow_gateway``: load settings from the environment and serve HTTP until SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib

from duanflow_kit.service import main as run_main

from duanflow_gateway import settings
from duanflow_gateway.app import build_app


def main() -> None:
    """Run the gateway service (on uvloop where it is installed: the request path is event-loop bound)."""
    with contextlib.suppress(ImportError):
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    run_main(build_app(settings.load()).run())


if __name__ == "__main__":
    main()

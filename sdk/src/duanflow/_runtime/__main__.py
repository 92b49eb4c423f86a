"""``python -m duanflow._runtime``: one replica, started by an agent with the env of docs/CONTRACTS.md."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

from duanflow import _telemetry
from duanflow._runtime import job, logcapture, queue_worker
from duanflow._runtime.config import ConfigError, RuntimeConfig
from duanflow._runtime.worker import load_target, serve


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's event loop where it is installed (the replica's hot path is loop bound), else asyncio's own."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def main() -> int:
    """Run the replica; exit 0 after a SIGTERM drain, 1 when the code cannot be loaded, 2 on bad config."""
    _telemetry.replica_starting()
    logcapture.install(logging.INFO)
    try:
        config = RuntimeConfig.from_env()
    except ConfigError as exc:
        print(f"duanflow runtime: {exc}", file=sys.stderr)
        return 2
    cwd = str(Path.cwd())
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    try:
        target = load_target(config)
    except Exception:
        print(
            f"duanflow runtime: cannot load {config.function} of app {config.app} from module {config.module}:\n"
            + traceback.format_exc(),
            file=sys.stderr,
        )
        return 1
    _telemetry.startup_phase("load code")
    _telemetry.setup_from_env(f"duanflow-replica-{config.app}")
    try:
        with asyncio.Runner(loop_factory=loop_factory()) as runner:
            if config.job_id:
                runner.run(job.serve_job(config, target))
            elif queue_worker.is_queue_worker(target.spec):
                runner.run(queue_worker.serve(config, target))
            else:
                runner.run(serve(config, target))
    except Exception:
        print(f"duanflow runtime: replica {config.replica_id} failed:\n{traceback.format_exc()}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # Threads of timed-out sync functions cannot be stopped; do not wait for them at exit.
    os._exit(code)

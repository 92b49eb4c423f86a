"""Build logs and build-done events over NATS."""

from __future__ import annotations

import logging
import time
from typing import Any

from duanflow_proto import codec, subjects
from duanflow_proto.messages.build import BuildResult
from duanflow_proto.messages.logs import LogLine

log = logging.getLogger("duanflow.builder.events")


class NatsBuildEvents:
    """:class:`duanflow_builder.ports.BuildEvents` on a nats-py connection (the logs stream captures lines)."""

    def __init__(self, nc: Any) -> None:
        self._nc = nc

    async def line(self, line: LogLine) -> None:
        """Publish one build-log line; a failure is logged, never raised."""
        try:
            await self._nc.publish(subjects.logs(line.env, line.app, line.kind, line.source), codec.encode(line))
        except Exception as exc:
            log.warning("build log line not published: %s", exc)

    async def done(self, result: BuildResult) -> None:
        """Announce a built image on ``subjects.build_done``."""
        try:
            await self._nc.publish(subjects.build_done(result.image_id), codec.encode(result))
            await self._nc.flush()
        except Exception as exc:
            log.warning("build-done event not published: %s", exc)


class SystemClock:
    """:class:`duanflow_builder.ports.Clock` from the system clocks."""

    def now_ms(self) -> int:
        """Epoch milliseconds."""
        return time.time_ns() // 1_000_000

    def monotonic(self) -> float:
        """Monotonic seconds."""
        return time.monotonic()

"""The per-role NATS users: replicas (agent role) may read the control API but not change the platform."""

from __future__ import annotations

import asyncio

import nats
import pytest
from duanflow._local import servers
from duanflow_proto import subjects

pytestmark = pytest.mark.timeout(30)


async def _violations(
    nats_server: tuple[servers.Proc, servers.NatsCredentials], user: str, password: str, subject: str
) -> list[str]:
    seen: list[str] = []
    got = asyncio.Event()

    async def on_error(exc: Exception) -> None:
        seen.append(str(exc))
        got.set()

    nc = await nats.connect(nats_server[0].address, user=user, password=password, error_cb=on_error)
    try:
        await nc.publish(subject, b"{}")
        await nc.flush()
        await asyncio.wait_for(got.wait(), timeout=5)
    finally:
        await nc.close()
    return seen


@pytest.mark.parametrize(
    "subject",
    [
        subjects.API_SECRET_CREATE,
        subjects.API_SECRET_LIST,
        subjects.API_DEPLOY,
        subjects.API_PRICE_SET,
        subjects.API_JOB_SUBMIT,
        subjects.API_JOB_CANCEL,
    ],
)
async def test_agent_role_may_not_call_platform_changing_apis(
    nats_server: tuple[servers.Proc, servers.NatsCredentials], subject: str
) -> None:
    seen = await _violations(nats_server, "agent", nats_server[1].agent, subject)
    assert any("permissions violation" in s.lower() for s in seen), seen


async def test_agent_role_may_still_look_functions_up(
    nats_server: tuple[servers.Proc, servers.NatsCredentials],
) -> None:
    nc = await nats.connect(nats_server[0].address, user="agent", password=nats_server[1].agent)
    try:
        await nc.publish(subjects.API_FUNCTION_LOOKUP, b"{}")
        await nc.flush()
        assert nc.last_error is None
    finally:
        await nc.close()

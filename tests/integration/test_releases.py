"""Releases on the real router: a rollback re-activates the stored release itself (no new release, no build)."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest
from duanflow_proto import subjects
from duanflow_proto.errors import InvalidInputError, NotFoundError
from duanflow_proto.messages.release import DeployReply, DeployRequest, ReleaseList, ReleaseListRequest
from duanflow_router.settings import Settings
from integration.test_secrets import StandIn, call, router, spec_with, upload_bundle

pytestmark = pytest.mark.timeout(90)

__all__ = ["router"]  # the fixture, shared with the secrets tests


async def test_rollback_reactivates_the_stored_release(router: Settings, nc_service: Any, unique: str) -> None:
    key1, digest1 = await upload_bundle(nc_service, b"v1 " + unique.encode())
    key2, digest2 = await upload_bundle(nc_service, b"v2 " + unique.encode())
    spec = spec_with(unique, secrets=[])
    async with StandIn(nc_service, f"ag-{unique}") as agent:
        first: DeployReply = await call(
            nc_service,
            subjects.API_DEPLOY,
            DeployRequest(spec=spec, env=unique, bundle_key=key1, bundle_digest=digest1),
            DeployReply,
        )
        second: DeployReply = await call(
            nc_service,
            subjects.API_DEPLOY,
            DeployRequest(spec=spec, env=unique, bundle_key=key2, bundle_digest=digest2),
            DeployReply,
        )
        rel1 = first.release
        back: DeployReply = await call(
            nc_service,
            subjects.API_DEPLOY,
            DeployRequest(
                spec=rel1.spec,
                env=unique,
                bundle_key=rel1.bundle_key,
                bundle_digest=rel1.bundle_digest,
                activate_release=rel1.release_id,
            ),
            DeployReply,
        )
        assert back.release.release_id == rel1.release_id and back.release.active
        assert agent.starts[-1].release == rel1.release_id and agent.starts[-1].bundle_digest == digest1
        # the new replica of rel1 started before the replica of the second release stopped
        assert [s.replica_id for s in agent.stops][-1] == second.replicas[0]
        listed: ReleaseList = await call(
            nc_service, subjects.API_RELEASES, ReleaseListRequest(app=unique, env=unique), ReleaseList
        )
        assert sorted(r.release_id for r in listed.releases) == sorted([rel1.release_id, second.release.release_id])
        assert [r.release_id for r in listed.releases if r.active] == [rel1.release_id]

        with pytest.raises(NotFoundError, match="has no release 'rel_19990101_0000'"):
            await call(
                nc_service,
                subjects.API_DEPLOY,
                DeployRequest(
                    spec=spec, env=unique, bundle_key=key1, bundle_digest=digest1, activate_release="rel_19990101_0000"
                ),
                DeployReply,
            )
        other = msgspec.structs.replace(rel1.spec, env={"CHANGED": "1"})
        with pytest.raises(InvalidInputError, match="own spec and bundle"):
            await call(
                nc_service,
                subjects.API_DEPLOY,
                DeployRequest(
                    spec=other,
                    env=unique,
                    bundle_key=key1,
                    bundle_digest=digest1,
                    activate_release=second.release.release_id,
                ),
                DeployReply,
            )

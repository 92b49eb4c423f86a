"""The router's side of endpoints: two apps claiming one method + path is a deploy error, and a bearer-auth
endpoint's route entry carries a salted digest of its token (never the token), or the deploy is refused."""

from __future__ import annotations

from typing import Any

import pytest
from duanflow_gateway.domain import check_auth
from duanflow_proto import codec, subjects
from duanflow_proto.errors import ConflictError, InvalidInputError, UnauthenticatedError
from duanflow_proto.messages.release import AppSpec, DeployReply, DeployRequest, EndpointSpec, FunctionSpec, RouteEntry
from duanflow_router.settings import Settings
from test_router import StandInAgent, call, h100, router, upload_bundle  # type: ignore[import-not-found]

pytestmark = pytest.mark.timeout(90)
__all__ = ["router"]


def web(path: str, auth: str | None = None, **options: Any) -> FunctionSpec:
    ep = EndpointSpec(method="POST", path=path, auth_secret=auth)
    return FunctionSpec(name="web", kind="endpoint", endpoint=ep, **options)


async def deploy(nc: Any, spec: AppSpec, env: str, key: str, digest: str) -> DeployReply:
    reply: DeployReply = await call(
        nc, subjects.API_DEPLOY, DeployRequest(spec=spec, env=env, bundle_key=key, bundle_digest=digest), DeployReply
    )
    return reply


async def test_two_apps_cannot_claim_one_route(router: Settings, nc_service: Any, unique: str) -> None:
    key, digest = await upload_bundle(nc_service, b"conflict " + unique.encode())
    env = f"e{unique}"
    async with StandInAgent(nc_service, f"ag-{unique}", [h100(0), h100(1), h100(2)]):
        await deploy(
            nc_service, AppSpec(name=f"{unique}-a", module="m", functions=[web("/v1/x/{id}")]), env, key, digest
        )
        other = AppSpec(name=f"{unique}-b", module="m", functions=[web("/v1/x/{item}")])
        with pytest.raises(ConflictError) as info:
            await deploy(nc_service, other, env, key, digest)
        assert f"{unique}-a" in info.value.message
        # the first app redeploying its own route is fine
        await deploy(
            nc_service, AppSpec(name=f"{unique}-a", module="m", functions=[web("/v1/x/{id}")]), env, key, digest
        )


async def test_bearer_route_carries_a_digest_never_the_token(router: Settings, nc_service: Any, unique: str) -> None:
    key, digest = await upload_bundle(nc_service, b"auth " + unique.encode())
    env = f"e{unique}"
    token = f"sk-{unique}-secret"
    async with StandInAgent(nc_service, f"ag-{unique}", [h100(0), h100(1)]):
        missing = AppSpec(name=unique, module="m", functions=[web("/v1/auth", auth="API_KEY")])
        with pytest.raises(InvalidInputError) as info:
            await deploy(nc_service, missing, env, key, digest)
        assert "API_KEY" in info.value.message
        spec = AppSpec(name=unique, module="m", functions=[web("/v1/auth", auth="API_KEY")], env={"API_KEY": token})
        await deploy(nc_service, spec, env, key, digest)
        kv = await nc_service.jetstream().key_value(subjects.KV_ROUTES)
        raw = (await kv.get(f"{env}.{unique}.web")).value
        assert token.encode() not in raw
        entry = codec.decode(raw, RouteEntry)
        check_auth(entry, f"Bearer {token}")
        with pytest.raises(UnauthenticatedError):
            check_auth(entry, "Bearer sk-other")

"""What a release's replicas get beyond the spec: secret env vars, the venv image URL or the docker image; and
``duanflow stop``.

The control plane calls :meth:`ReplicaSetup.check` before a release is stored (a missing secret fails the deploy
naming it, leaving nothing behind) and :meth:`ReplicaSetup.for_replica` for every ``StartReplica``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

import msgspec
from duanflow_proto import subjects
from duanflow_proto.errors import InvalidInputError, NotFoundError, details
from duanflow_proto.messages.build import docker_image_ref, image_artifact_key
from duanflow_proto.messages.release import AppSpec, AppStopReply, AppStopRequest, DeployRequest, FunctionSpec, Release

from duanflow_router.domain import replica_runtime
from duanflow_router.ports import BlobStore, ReleaseStore, ReplicaRecord
from duanflow_router.secrets import Secrets, all_names, names_of

IMAGE_URL_TTL_S = 3600


@dataclass(frozen=True)
class ReplicaExtras:
    """The env vars (plain and secret), which of them are secret, and the image of one replica."""

    env_vars: dict[str, str]
    secret_keys: list[str] = field(default_factory=list)
    image_url: str = ""
    """Presigned GET of the packed venv image (process runtime); empty: none."""
    docker_image: str = ""
    """Registry reference of the release's docker image (docker runtime); empty: the process runtime."""


class AppSwitch(Protocol):
    """Turns an app off in the release store."""

    async def deactivate(self, env: str, app: str) -> str | None:
        """Clear the active flag; the release that was active, or None."""
        ...


class ReplicaSetup:
    """Secret checks and injection, image URLs, and stopping apps, over the control plane's stores."""

    def __init__(self, secrets: Secrets, blobs: BlobStore, switch: AppSwitch, *, docker_registry: str = "") -> None:
        self.secrets = secrets
        self.blobs = blobs
        self.switch = switch
        self.docker_registry = docker_registry
        """The registry the builder's docker backend pushes to (``host:port``); empty: docker images are refused."""

    async def check(self, req: DeployRequest) -> None:
        """Refuse a deploy whose secrets are missing, whose bearer-auth secret sets no such key, or whose docker
        image this router cannot name."""
        spec, env = req.spec, req.env
        if replica_runtime(spec.image, bool(self.docker_registry)):
            self._check_docker(req)
        names = all_names(spec)
        for name in names:
            if not isinstance(name, str) or not name:
                raise InvalidInputError("empty secret name in the app spec", details=details(field="secrets"))
        await self.secrets.require(env, names)
        for fn in spec.functions:
            wanted = fn.endpoint.auth_secret if fn.endpoint is not None else None
            if not wanted or fn.env.get(wanted) or spec.env.get(wanted):
                continue
            have = await self.secrets.values(env, names_of(spec, fn)) if names_of(spec, fn) else {}
            if not have.get(wanted):
                raise InvalidInputError(
                    f"{fn.name} uses Auth.bearer({wanted!r}) but neither the app's env nor its secrets set "
                    f"{wanted}: e.g. `duanflow secret create api-key {wanted}=...` and "
                    "df.App(..., secrets=[df.Secret.from_name('api-key')])",
                    details=details(function=fn.name),
                )

    def _check_docker(self, req: DeployRequest) -> None:
        used = "Debian packages or build commands"
        if not self.docker_registry:
            raise InvalidInputError(
                f"the image of {req.spec.name} ({used}) runs only on the docker runtime, and this router has no "
                "registry to run it from: set DUANFLOW_ROUTER_DOCKER_REGISTRY to the builder's "
                "DUANFLOW_BUILDER_DOCKER_REGISTRY",
                details=details(app=req.spec.name, needs="docker"),
            )
        if not req.image_id:
            raise InvalidInputError(
                f"the image of {req.spec.name} ({used}) runs only on the docker runtime: deploy it with the image "
                "id the builder's docker backend built (`duanflow deploy` does)",
                details=details(app=req.spec.name, needs="docker"),
            )

    async def for_replica(self, release: Release, fn: FunctionSpec) -> ReplicaExtras:
        """Env vars of one replica: the app's and function's plain env, then its secrets' keys (secrets win); and
        its image: the docker image when only docker builds the release's image, else the packed venv if any."""
        plain = {**release.spec.image.env, **release.spec.env, **fn.env}
        secret_env = await self.secrets.values(release.env, names_of(release.spec, fn))
        if replica_runtime(release.spec.image, bool(self.docker_registry)):
            if not self.docker_registry or not release.image_id:  # check() refuses such deploys; a stale release
                raise InvalidInputError(
                    f"release {release.release_id} of {release.app} needs the docker runtime, but this router has "
                    "no DUANFLOW_ROUTER_DOCKER_REGISTRY or the release no image id",
                    details=details(app=release.app, release=release.release_id, needs="docker"),
                )
            return ReplicaExtras(
                env_vars={**plain, **secret_env},
                secret_keys=sorted(secret_env),
                docker_image=docker_image_ref(self.docker_registry, release.image_id),
            )
        image_url = ""
        if release.image_id:
            key = image_artifact_key(release.image_id)
            if await self.blobs.exists(key):
                image_url = await self.blobs.presign_get(key, IMAGE_URL_TTL_S)
        return ReplicaExtras(env_vars={**plain, **secret_env}, secret_keys=sorted(secret_env), image_url=image_url)

    async def with_bearer_env(self, release: Release) -> Release:
        """The release with bearer tokens that come from secrets copied into its spec's env.

        Only :func:`duanflow_router.domain.route_entries` sees this copy, to digest the tokens; it is never stored.
        """
        fns: list[FunctionSpec] = []
        for fn in release.spec.functions:
            wanted = fn.endpoint.auth_secret if fn.endpoint is not None else None
            if wanted and not fn.env.get(wanted) and not release.spec.env.get(wanted):
                values = await self.secrets.values(release.env, names_of(release.spec, fn))
                if values.get(wanted):
                    fn = msgspec.structs.replace(fn, env={**fn.env, wanted: values[wanted]})
            fns.append(fn)
        if fns == list(release.spec.functions):
            return release
        spec: AppSpec = msgspec.structs.replace(release.spec, functions=fns)
        return msgspec.structs.replace(release, spec=spec)

    async def stored_release(self, store: ReleaseStore, req: DeployRequest) -> Release | None:
        """The stored release a rollback re-activates (``activate_release``), or None for a new release."""
        if not req.activate_release:
            return None
        found = next(
            (r for r in await store.list_releases(req.env, req.spec.name) if r.release_id == req.activate_release),
            None,
        )
        if found is None:
            raise NotFoundError(
                f"app {req.spec.name!r} has no release {req.activate_release!r} in env {req.env!r}",
                details=details(app=req.spec.name, env=req.env, release=req.activate_release),
            )
        if found.spec != req.spec or found.bundle_digest != req.bundle_digest.strip().lower():
            raise InvalidInputError(
                f"a rollback to {found.release_id} must send that release's own spec and bundle",
                details=details(release=found.release_id),
            )
        return found

    async def stop_app(
        self,
        req: AppStopRequest,
        running: Callable[[str, str], Awaitable[list[ReplicaRecord]]],
        stop_all: Callable[[list[ReplicaRecord]], Awaitable[None]],
        clear_routes: Callable[[str, str], Awaitable[None]],
    ) -> AppStopReply:
        """Deactivate the app's release, remove its HTTP routes, then drain and stop its replicas."""
        try:
            env, app = subjects.token(req.env), subjects.token(req.app)
        except ValueError as exc:
            raise InvalidInputError(f"invalid name: {exc}") from None
        was = await self.switch.deactivate(env, app)
        replicas = await running(env, app)
        if was is None and not replicas:
            raise NotFoundError(f"app {app!r} is not running in env {env!r}", details=details(app=app, env=env))
        await clear_routes(env, app)
        await stop_all(replicas)
        return AppStopReply(app=app, env=env, release=was or "", replicas=[r.replica_id for r in replicas])

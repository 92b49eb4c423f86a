"""Secrets use cases: create, list, delete, and resolve a deploy's secret names into env vars.

Values are sealed (AES-GCM, :mod:`duanflow_router.adapters.crypto`) before they reach the store and are
opened only to build a replica's environment; no value is ever logged or returned by the API.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from datetime import UTC, datetime

import msgspec
from duanflow_proto import subjects
from duanflow_proto.errors import ConflictError, InternalError, InvalidInputError, NotFoundError, details
from duanflow_proto.messages.release import AppSpec, FunctionSpec
from duanflow_proto.messages.secret import (
    SecretCreateRequest,
    SecretDeleteRequest,
    SecretInfo,
    SecretList,
    SecretListRequest,
)

from duanflow_router.ports_secrets import Sealer, SecretRow, SecretStore, UnsealError

ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
SECRET_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
MAX_KEYS = 256
MAX_VALUE_BYTES = 64 * 1024
RESERVED = frozenset(
    {"PYTHONPATH", "CUDA_VISIBLE_DEVICES"}
    | {
        f"DUANFLOW_{n}"
        for n in (
            "NATS_URL",
            "NATS_USER",
            "NATS_PASSWORD",
            "REPLICA_ID",
            "ENV",
            "APP",
            "RELEASE",
            "FUNCTION",
            "MODULE",
            "STREAM",
            "CONSUMER",
            "CONCURRENCY",
            "TIMEOUT_S",
            "SIMULATED_GPU",
        )
    }
)
"""Env vars the agent sets in every replica (``docs/CONTRACTS.md``): a secret may not shadow them."""
NO_KEY = (
    "this router has no secret key, so it cannot store or inject secrets: set DUANFLOW_ROUTER_SECRET_KEY "
    "(32+ random characters; `duanflow dev up` sets one) and restart the router"
)


def _now_ms() -> int:
    return int(datetime.now(UTC).timestamp() * 1000)


def context(env: str, name: str) -> bytes:
    """Associated data binding a sealed value to its row.

    >>> context("main", "hf-prod")
    b'duanflow-secret/main/hf-prod'
    """
    return f"duanflow-secret/{env}/{name}".encode()


def check_name(name: str) -> str:
    """A valid secret name (lowercase letters, digits, ``-`` and ``_``), or :class:`InvalidInputError`.

    >>> check_name("hf-prod")
    'hf-prod'
    """
    if not isinstance(name, str) or not SECRET_NAME.match(name):
        raise InvalidInputError(
            f"invalid secret name {name!r}: use lowercase letters, digits, '-' and '_' (up to 63, e.g. hf-prod)",
            details=details(field="name", value=str(name)[:80]),
        )
    return name


def check_values(values: dict[str, str]) -> dict[str, str]:
    """Env var names and sizes of a secret's values (the values themselves are never echoed)."""
    if not values:
        raise InvalidInputError("a secret needs at least one KEY=VALUE", details=details(field="values"))
    if len(values) > MAX_KEYS:
        raise InvalidInputError(f"a secret holds at most {MAX_KEYS} keys", details=details(field="values"))
    for key, value in values.items():
        if not ENV_NAME.match(key):
            raise InvalidInputError(
                f"secret key {key!r} is not an environment variable name (letters, digits, _; not first a digit)",
                details=details(field="values", key=key[:80]),
            )
        if key in RESERVED:
            raise InvalidInputError(
                f"secret key {key!r} is set by the platform in every replica: pick another name",
                details=details(field="values", key=key),
            )
        if len(value.encode()) > MAX_VALUE_BYTES or "\0" in value:
            raise InvalidInputError(
                f"the value of {key} is over {MAX_VALUE_BYTES} bytes or holds a NUL byte",
                details=details(field="values", key=key),
            )
    return values


def names_of(spec: AppSpec, fn: FunctionSpec | None = None) -> list[str]:
    """The secret names a function's replicas get: the app's, then the function's own (order kept)."""
    out: list[str] = []
    for name in [*spec.secrets, *(fn.secrets if fn is not None else [])]:
        if name not in out:
            out.append(name)
    return out


def all_names(spec: AppSpec) -> list[str]:
    """Every secret name an app's spec refers to."""
    out = names_of(spec)
    for fn in spec.functions:
        out.extend(n for n in fn.secrets if n not in out)
    return out


class Secrets:
    """Sealed secrets of every env; ``sealer`` None means the router has no key (every call says so)."""

    def __init__(self, store: SecretStore, sealer: Sealer | None, now_ms: Callable[[], int] = _now_ms) -> None:
        self.store = store
        self.sealer = sealer
        self._now_ms = now_ms

    def _sealer(self) -> Sealer:
        if self.sealer is None:
            raise InvalidInputError(NO_KEY, details=details(setting="DUANFLOW_ROUTER_SECRET_KEY"))
        return self.sealer

    @staticmethod
    def _env(env: str) -> str:
        try:
            return subjects.token(env)
        except ValueError as exc:
            raise InvalidInputError(f"invalid env name: {exc}", details=details(field="env")) from None

    async def create(self, req: SecretCreateRequest) -> SecretInfo:
        """Seal and store one secret (replacing it unless ``replace`` is False)."""
        env, name = self._env(req.env), check_name(req.name)
        values = check_values(dict(req.values))
        sealed = self._sealer().seal(msgspec.json.encode(values, order="sorted"), context(env, name))
        now = self._now_ms()
        row = SecretRow(env=env, name=name, keys=tuple(sorted(values)), sealed=sealed, created_ms=now, updated_ms=now)
        if not await self.store.put(row, replace=req.replace):
            raise ConflictError(f"secret {name!r} already exists in env {env!r}", details=details(env=env, name=name))
        return _info(row)

    async def list(self, req: SecretListRequest) -> SecretList:
        """Names and key names of an env's secrets."""
        return SecretList(secrets=[_info(r) for r in await self.store.list(self._env(req.env))])

    async def delete(self, req: SecretDeleteRequest) -> SecretInfo:
        """Remove one secret; :class:`NotFoundError` when there is none of that name."""
        env, name = self._env(req.env), check_name(req.name)
        row = await self.store.delete(env, name)
        if row is None:
            raise NotFoundError(f"no secret {name!r} in env {env!r}", details=details(env=env, name=name))
        return _info(row)

    async def require(self, env: str, names: Iterable[str]) -> None:
        """Refuse a deploy naming secrets that do not exist (all missing ones named at once)."""
        wanted = list(dict.fromkeys(names))
        if not wanted:
            return
        self._sealer()
        found = await self.store.get(env, wanted)
        missing = [n for n in wanted if n not in found]
        if missing:
            listed = ", ".join(repr(n) for n in missing)
            raise NotFoundError(
                f"the app uses secret(s) {listed} that do not exist in env {env!r}: create them with "
                f"`duanflow secret create {missing[0]} KEY=VALUE --env {env}`",
                details=details(env=env, missing=",".join(missing)),
            )

    async def values(self, env: str, names: Iterable[str]) -> dict[str, str]:
        """The env vars of ``names`` merged in order (a later secret wins a shared key)."""
        wanted = list(dict.fromkeys(names))
        if not wanted:
            return {}
        await self.require(env, wanted)
        sealer = self._sealer()
        rows = await self.store.get(env, wanted)
        merged: dict[str, str] = {}
        for name in wanted:
            try:
                plain = sealer.unseal(rows[name].sealed, context(env, name))
            except UnsealError as exc:
                raise InternalError(
                    f"secret {name!r} of env {env!r} cannot be opened: {exc}; create it again",
                    details=details(env=env, name=name),
                ) from None
            merged.update(msgspec.json.decode(plain, type=dict[str, str]))
        return merged


def _info(row: SecretRow) -> SecretInfo:
    return SecretInfo(
        name=row.name, env=row.env, keys=list(row.keys), created_ms=row.created_ms, updated_ms=row.updated_ms
    )

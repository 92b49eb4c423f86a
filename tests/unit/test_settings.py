"""Typed settings: every service reads ``DUANFLOW_<SVC>_*`` (and the shared ``DUANFLOW_NATS_*``), documents every
field, and refuses bad values with a message instead of a traceback."""

from __future__ import annotations

import ast
import importlib
import inspect
import textwrap
from types import ModuleType

import msgspec
import pytest
from duanflow_kit.settings import BaseSettings, env_names, load_settings, required_fields
from duanflow_proto import subjects

SERVICES = [s for s in subjects.SERVICES]


def _module(service: str) -> ModuleType:
    return importlib.import_module(f"duanflow_{service}.settings")


def _required_env(service: str) -> dict[str, str]:
    mod = _module(service)
    return {f"{mod.PREFIX}{name.upper()}": "x" for name in required_fields(mod.Settings)}


class _Demo(BaseSettings, frozen=True, kw_only=True):
    port: int = 1
    """A port."""
    tags: list[str] = []
    """Some tags."""
    prices: dict[str, float] = {}
    """Some prices."""
    flag: bool = False
    """A flag."""
    dsn: str
    """Required."""


def test_env_names_cover_prefixed_and_shared_names() -> None:
    names = env_names(_Demo, "DUANFLOW_DEMO_")
    assert names["DUANFLOW_DEMO_PORT"] == "port"
    assert names["DUANFLOW_DEMO_NATS_URL"] == "nats_url"
    assert names["DUANFLOW_NATS_URL"] == "nats_url"
    assert names["DUANFLOW_NATS_PASSWORD"] == "nats_password"
    assert "DUANFLOW_PORT" not in names, "only the NATS fields are shared"


def test_required_fields() -> None:
    assert required_fields(_Demo) == ["dsn"]


def test_load_settings_parses_types() -> None:
    env = {
        "DUANFLOW_DEMO_DSN": "postgresql://x",
        "DUANFLOW_DEMO_PORT": "8",
        "DUANFLOW_DEMO_TAGS": "a,b",
        "DUANFLOW_DEMO_PRICES": '{"H100": 2.5}',
        "DUANFLOW_DEMO_FLAG": "true",
    }
    s = load_settings(_Demo, "DUANFLOW_DEMO_", env)
    assert (s.port, s.tags, s.prices, s.flag, s.dsn) == (8, ["a", "b"], {"H100": 2.5}, True, "postgresql://x")


def test_prefixed_name_wins_over_shared() -> None:
    env = {
        "DUANFLOW_DEMO_DSN": "d",
        "DUANFLOW_NATS_URL": "nats://shared:4222",
        "DUANFLOW_DEMO_NATS_URL": "nats://own:4222",
    }
    assert load_settings(_Demo, "DUANFLOW_DEMO_", env).nats_url == "nats://own:4222"
    env.pop("DUANFLOW_DEMO_NATS_URL")
    assert load_settings(_Demo, "DUANFLOW_DEMO_", env).nats_url == "nats://shared:4222"


def test_unrelated_variables_are_ignored() -> None:
    s = load_settings(_Demo, "DUANFLOW_DEMO_", {"DUANFLOW_DEMO_DSN": "d", "DUANFLOW_OTHER_PORT": "9", "PORT": "7"})
    assert s.port == 1


@pytest.mark.parametrize(
    "env",
    [
        {},
        {"DUANFLOW_DEMO_DSN": "d", "DUANFLOW_DEMO_PORT": "eighty"},
        {"DUANFLOW_DEMO_DSN": "d", "DUANFLOW_DEMO_PRICES": "{"},
    ],
    ids=["missing-required", "bad-int", "bad-json"],
)
def test_bad_settings_exit_with_a_message(env: dict[str, str]) -> None:
    with pytest.raises(SystemExit) as info:
        load_settings(_Demo, "DUANFLOW_DEMO_", env)
    assert "DUANFLOW_DEMO_" in str(info.value.code)


@pytest.mark.parametrize("service", SERVICES)
def test_service_settings_shape(service: str) -> None:
    mod = _module(service)
    assert f"DUANFLOW_{service.upper()}_" == mod.PREFIX
    assert issubclass(mod.Settings, BaseSettings)
    cfg = mod.Settings.__struct_config__
    assert cfg.frozen


@pytest.mark.parametrize("service", SERVICES)
def test_service_settings_load_from_required_env_only(service: str) -> None:
    mod = _module(service)
    s = load_settings(mod.Settings, mod.PREFIX, _required_env(service))
    assert isinstance(s, mod.Settings)
    assert s.nats_url.startswith("nats://")


@pytest.mark.parametrize("service", SERVICES)
def test_service_settings_fields_are_documented(service: str) -> None:
    cls = _module(service).Settings
    documented: set[str] = set()
    for klass in cls.__mro__:
        if not (isinstance(klass, type) and issubclass(klass, BaseSettings)):
            continue
        tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        body = next(n for n in tree.body if isinstance(n, ast.ClassDef)).body
        for i, node in enumerate(body[:-1]):
            nxt = body[i + 1]
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)
            ):
                documented.add(node.target.id)
    missing = [f.name for f in msgspec.structs.fields(cls) if f.name not in documented]
    assert not missing, f"duanflow_{service} settings without a docstring: {missing}"


@pytest.mark.parametrize("service", SERVICES)
def test_shared_nats_variables_reach_every_service(service: str) -> None:
    mod = _module(service)
    env = {
        **_required_env(service),
        "DUANFLOW_NATS_URL": "nats://a:4222,nats://b:4222",
        "DUANFLOW_NATS_USER": "service",
    }
    s = load_settings(mod.Settings, mod.PREFIX, env)
    assert s.nats_url.split(",") == ["nats://a:4222", "nats://b:4222"]
    assert s.nats_user == "service"

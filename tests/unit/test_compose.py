"""docker-compose.yml, checked statically (no docker engine needed): every DuanFlow container sets only real
settings of its service and every required one, with values its settings class accepts; the NATS cluster has three
JetStream nodes with the per-role users of the local stack; the agent reserves NVIDIA GPUs; every secret comes from
the env file that ``make up`` writes."""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
import stat
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml
from duanflow_kit.settings import BaseSettings, env_names, load_settings, required_fields
from duanflow_proto import subjects

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "docker" / "Dockerfile"
NATS_NODES = ("nats-1", "nats-2", "nats-3")
ROLES = ("client", "agent", "service")
# ${NAME}, ${NAME:-default}, ${NAME-default}, ${NAME:?error}, ${NAME?error}
INTERPOLATION = re.compile(r"\$\{(?P<name>[A-Z0-9_]+)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}")


def _script(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"duanflow_scripts_{name}", ROOT / "scripts" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE_FILE.read_text(encoding="utf-8"))
    assert isinstance(data, dict) and isinstance(data.get("services"), dict)
    return data


COMPOSE = _compose()
SERVICES: dict[str, dict[str, Any]] = COMPOSE["services"]


def _environment(container: dict[str, Any]) -> dict[str, str]:
    """A container's environment as a mapping (compose accepts a mapping or a list of ``NAME=value``)."""
    env = container.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {str(k): "" if v is None else str(v) for k, v in env.items()}


def _resolve(value: str) -> str:
    """The value with interpolations replaced: defaults where given, else a placeholder for an env-file secret."""
    return INTERPOLATION.sub(lambda m: m["arg"] if m["op"] in (":-", "-") else "secret", value.replace("$$", "$"))


def _settings(service: str) -> tuple[type[BaseSettings], str]:
    mod = importlib.import_module(f"duanflow_{service}.settings")
    return mod.Settings, mod.PREFIX


def setting_problems(service: str, env: dict[str, str]) -> list[str]:
    """What is wrong with ``env`` as the configuration of ``service``: unknown DUANFLOW_* names, required settings
    left unset, values the settings class refuses."""
    cls, prefix = _settings(service)
    known = env_names(cls, prefix)
    problems = [
        f"{name} is not a setting of duanflow_{service} (known: {', '.join(sorted(known))})"
        for name in sorted(env)
        if name.startswith("DUANFLOW_") and name not in known
    ]
    set_fields = {known[name] for name in env if name in known}
    problems += [
        f"required setting {prefix}{field.upper()} of duanflow_{service} is not set"
        for field in required_fields(cls)
        if field not in set_fields
    ]
    if not problems:
        try:
            load_settings(cls, prefix, {name: _resolve(value) for name, value in env.items()})
        except SystemExit as exc:
            problems.append(str(exc.code))
    return problems


# --------------------------------------------------------------------------- DuanFlow containers and their settings


def test_one_container_per_service() -> None:
    assert set(subjects.SERVICES) <= set(SERVICES), f"missing: {sorted(set(subjects.SERVICES) - set(SERVICES))}"


@pytest.mark.parametrize("service", subjects.SERVICES)
def test_container_builds_the_one_dockerfile_for_its_service(service: str) -> None:
    build = SERVICES[service]["build"]
    assert build["context"] == "."
    assert build["dockerfile"] == "docker/Dockerfile"
    assert build["args"]["SERVICE"] == service
    assert "command" not in SERVICES[service], "the image runs `python -m duanflow_<SERVICE>` by itself"


def test_dockerfile_is_parameterised_by_service() -> None:
    text = DOCKERFILE.read_text(encoding="utf-8")
    assert re.search(r"^ARG SERVICE$", text, re.MULTILINE)
    assert '--package "duanflow-${SERVICE}"' in text
    assert "python -m duanflow_${DUANFLOW_SERVICE}" in text
    assert re.search(r"^USER duanflow$", text, re.MULTILINE), "services do not run as root"
    # every package the image installs from is copied in
    for pyproject in sorted(ROOT.glob("services/*/pyproject.toml")):
        assert f"COPY {pyproject.relative_to(ROOT)} " in text, f"docker/Dockerfile does not copy {pyproject}"


@pytest.mark.parametrize("service", subjects.SERVICES)
def test_container_sets_only_real_settings_and_every_required_one(service: str) -> None:
    env = _environment(SERVICES[service])
    assert any(name.startswith("DUANFLOW_") for name in env)
    problems = setting_problems(service, env)
    assert not problems, f"docker-compose.yml, service {service}:\n  " + "\n  ".join(problems)


@pytest.mark.parametrize("service", subjects.SERVICES)
def test_container_talks_to_the_whole_nats_cluster_as_its_role(service: str) -> None:
    cls, prefix = _settings(service)
    env = {name: _resolve(value) for name, value in _environment(SERVICES[service]).items()}
    settings = load_settings(cls, prefix, env)
    assert sorted(settings.nats_url.split(",")) == [f"nats://{node}:4222" for node in NATS_NODES]
    role = "agent" if service == "agent" else "service"
    assert settings.nats_user == role
    raw = _environment(SERVICES[service])
    password = raw.get(f"{prefix}NATS_PASSWORD", raw.get("DUANFLOW_NATS_PASSWORD", ""))
    assert f"${{DUANFLOW_NATS_{role.upper()}_PASSWORD" in password, "the password comes from the env file"
    deps = SERVICES[service].get("depends_on", {})
    assert all(deps[node]["condition"] == "service_healthy" for node in NATS_NODES)


@pytest.mark.parametrize("service", ["router", "builder", "logs"])
def test_stateful_services_reach_postgres_and_minio(service: str) -> None:
    env = _environment(SERVICES[service])
    prefix = f"DUANFLOW_{service.upper()}_"
    assert env[f"{prefix}DATABASE_URL"].startswith("postgresql://duanflow:${DUANFLOW_POSTGRES_PASSWORD")
    assert "@postgres:5432/" in env[f"{prefix}DATABASE_URL"]
    assert env[f"{prefix}S3_ENDPOINT"] == "minio:9000"
    assert env[f"{prefix}S3_ACCESS_KEY"].startswith("${DUANFLOW_S3_ACCESS_KEY")
    assert env[f"{prefix}S3_SECRET_KEY"].startswith("${DUANFLOW_S3_SECRET_KEY")
    deps = SERVICES[service]["depends_on"]
    assert deps["postgres"]["condition"] == "service_healthy"
    assert deps["minio-init"]["condition"] == "service_completed_successfully"


def test_agent_reserves_nvidia_gpus() -> None:
    devices = SERVICES["agent"]["deploy"]["resources"]["reservations"]["devices"]
    assert any(d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []) for d in devices)


def test_gateway_listens_on_all_interfaces_and_is_published() -> None:
    env = _environment(SERVICES["gateway"])
    port = env["DUANFLOW_GATEWAY_HTTP_PORT"]
    assert env["DUANFLOW_GATEWAY_HTTP_HOST"] == "0.0.0.0"
    assert any(str(p).endswith(f":{port}") for p in SERVICES["gateway"]["ports"])


def test_the_settings_check_can_fail() -> None:
    env = {
        "DUANFLOW_NATS_URL": "nats://nats-1:4222",
        "DUANFLOW_ROUTER_DATABSE_URL": "postgresql://typo",  # misspelt, so DATABASE_URL is missing too
        "DUANFLOW_ROUTER_S3_ENDPOINT": "minio:9000",
        "DUANFLOW_ROUTER_S3_ACCESS_KEY": "a",
        "DUANFLOW_ROUTER_S3_SECRET_KEY": "b",
    }
    problems = setting_problems("router", env)
    assert any("DUANFLOW_ROUTER_DATABSE_URL is not a setting" in p for p in problems)
    assert any("DUANFLOW_ROUTER_DATABASE_URL of duanflow_router is not set" in p for p in problems)
    bad_port = {"DUANFLOW_GATEWAY_HTTP_PORT": "eighty"}
    assert setting_problems("gateway", bad_port), "a value the settings class refuses is a problem"


def test_depends_on_names_real_services() -> None:
    for name, container in SERVICES.items():
        deps = container.get("depends_on", {})
        unknown = sorted(set(deps) - set(SERVICES))
        assert not unknown, f"{name} depends on unknown services {unknown}"


def test_named_volumes_are_declared() -> None:
    declared = set(COMPOSE.get("volumes") or {})
    for name, container in SERVICES.items():
        for volume in container.get("volumes", []):
            source = str(volume).split(":", 1)[0]
            if not source.startswith((".", "/")):
                assert source in declared, f"{name} mounts undeclared volume {source}"


# --------------------------------------------------------------------------- infrastructure


def test_infrastructure_is_there() -> None:
    assert {"postgres", "minio", "minio-init", "registry", *NATS_NODES} <= set(SERVICES)
    assert str(SERVICES["postgres"]["image"]).startswith("postgres:")
    assert str(SERVICES["minio"]["image"]).startswith("minio/minio")
    assert str(SERVICES["registry"]["image"]).startswith("registry:")


@pytest.mark.parametrize("node", NATS_NODES)
def test_nats_node_runs_the_cluster_config_with_role_passwords(node: str) -> None:
    container = SERVICES[node]
    command = container["command"]
    assert command[command.index("-c") + 1] == "/etc/nats/nats.conf"
    assert command[command.index("--name") + 1] == node, "JetStream in a cluster needs a unique server name"
    assert "./docker/nats/nats.conf:/etc/nats/nats.conf:ro" in container["volumes"]
    assert any(str(v).endswith(":/data") for v in container["volumes"]), "JetStream state survives a restart"
    env = _environment(container)
    for role in ROLES:
        assert f"${{DUANFLOW_NATS_{role.upper()}_PASSWORD:?" in env[f"DUANFLOW_NATS_{role.upper()}_PASSWORD"]
    assert container["healthcheck"]["test"], "services wait for a healthy JetStream"


def test_nats_conf_is_current_and_clustered_with_jetstream() -> None:
    gen = _script("nats_conf")
    text = gen.CONF_PATH.read_text(encoding="utf-8")
    assert text == gen.render(), "docker/nats/nats.conf is stale: run `make nats-conf`"
    assert "jetstream {" in text
    for node in NATS_NODES:
        assert f"nats-route://{node}:6222" in text
    for role in ROLES:
        assert f'user: "{role}"' in text
        assert f"password: $DUANFLOW_NATS_{role.upper()}_PASSWORD" in text
    assert 'publish: { allow: [">"], deny: [] }' in text.split('user: "service"')[1].split("}")[0] + "}"
    client = text.split('user: "client"')[1].split('user: "service"')[0]
    assert '">"' not in client, "the client role is scoped, not open"


# --------------------------------------------------------------------------- secrets from the env file


def test_every_required_variable_is_written_by_make_up() -> None:
    required = {m["name"] for m in INTERPOLATION.finditer(COMPOSE_FILE.read_text()) if m["op"] in (":?", "?")}
    written = set(_script("compose_env").SECRETS)
    assert required == written, (
        f"docker-compose.yml requires {sorted(required)} but scripts/compose_env.py writes {sorted(written)}"
    )


def test_secrets_are_never_inline() -> None:
    for name, container in SERVICES.items():
        for key, value in _environment(container).items():
            if re.search(r"PASSWORD|SECRET|ACCESS_KEY", key):
                assert value.startswith("${"), f"{name}: {key} must come from the env file, not the compose file"


def test_compose_env_file_is_private_random_and_kept(tmp_path: Path) -> None:
    gen = _script("compose_env")
    path = tmp_path / "home" / "compose.env"
    assert gen.ensure(path) is True
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    first = gen.read(path)
    assert set(first) == set(gen.SECRETS)
    assert len(set(first.values())) == len(first), "every secret is its own random value"
    assert gen.ensure(path) is False
    assert gen.read(path) == first, "an existing env file is never overwritten"
    exports = gen.client_env(path)
    assert "DUANFLOW_NATS_USER=client" in exports
    assert f"DUANFLOW_NATS_PASSWORD={first['DUANFLOW_NATS_CLIENT_PASSWORD']}" in exports


def test_compose_env_refuses_an_incomplete_file(tmp_path: Path) -> None:
    gen = _script("compose_env")
    path = tmp_path / "compose.env"
    path.write_text("DUANFLOW_NATS_CLIENT_PASSWORD=x\n")
    with pytest.raises(SystemExit, match="DUANFLOW_POSTGRES_PASSWORD"):
        gen.ensure(path)


def test_default_env_file_is_under_duanflow_home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("DUANFLOW_HOME", str(tmp_path))
    assert _script("compose_env").default_path() == tmp_path / "compose.env"
    monkeypatch.delenv("DUANFLOW_HOME")
    assert _script("compose_env").default_path() == Path(os.path.expanduser("~")) / ".duanflow" / "compose.env"


# --------------------------------------------------------------------------- the make targets that drive it, and CI


def _make_targets() -> dict[str, str]:
    """Target name → its recipe text, from the Makefile."""
    targets: dict[str, str] = {}
    current = ""
    for line in (ROOT / "Makefile").read_text(encoding="utf-8").splitlines():
        match = re.match(r"^([a-z][a-z-]*):", line)
        if match:
            current = match[1]
            targets[current] = ""
        elif line.startswith("\t") and current:
            targets[current] += line + "\n"
    return targets


def test_make_targets_exist_and_up_down_drive_compose() -> None:
    targets = _make_targets()
    expected = {"help", "install", "dev", "dev-down", "test", "lint", "schemas", "bench", "up", "down"}
    assert expected <= set(targets), f"missing make targets: {sorted(expected - set(targets))}"
    assert "compose_env.py" in targets["up"] and "up -d" in targets["up"]
    assert "down" in targets["down"] and "--env-file" in targets["down"]


def test_ci_runs_lint_then_test() -> None:
    ci = ROOT / ".ci" / "run"
    assert os.access(ci, os.X_OK), ".ci/run must be executable"
    lines = [line.strip() for line in ci.read_text(encoding="utf-8").splitlines()]
    assert "set -euo pipefail" in lines
    assert lines.index("make lint") < lines.index("make test")

"""The local stack's machinery (``duanflow._local.stack`` and ``duanflow dev``) on real NATS, Postgres and S3.

The five services are stood in for by a small health responder, so these tests pin what ``dev up`` /
``status`` / ``down`` promise whatever state the services are in: credentials kept (0600), a second ``up``
refused, a failing component named with its log and everything torn down, no process left behind.
"""

from __future__ import annotations

import json
import os
import stat
import sys
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from duanflow import _config
from duanflow._cli.dev import app as dev_app
from duanflow._local import processes
from duanflow._local.stack import SERVICES, ComponentStartError, Stack, StackRunningError
from duanflow._local.state import CREDENTIALS_FILE, STATE_FILE, ComponentState, StackState, save_state
from fixtures.waiting import eventually_sync
from typer.testing import CliRunner

pytestmark = pytest.mark.timeout(120)

FAKE_SERVICE = r'''
"""Stands in for a DuanFlow service: answers HealthRequest on its health subject until SIGTERM."""
import asyncio, os, signal, subprocess, sys

import nats

from duanflow_proto import codec, subjects
from duanflow_proto.messages.common import HealthReply, HealthRequest


async def main(name: str, mode: str) -> None:
    nc = await nats.connect(
        os.environ["DUANFLOW_NATS_URL"],
        user=os.environ["DUANFLOW_NATS_USER"],
        password=os.environ["DUANFLOW_NATS_PASSWORD"],
    )
    if mode == "replica":  # like an agent's replica: its own session, no DUANFLOW_* env, not stopped by its parent
        clean = {k: v for k, v in os.environ.items() if not k.startswith("DUANFLOW_")}
        subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True, env=clean)

    async def on_health(msg):
        codec.decode(msg.data, HealthRequest)
        details = {"simulated_gpus": "6"} if os.environ.get("DUANFLOW_AGENT_SIMULATE") == "1" else {}
        reply = HealthReply(service=name, instance=name + "-fake", ok=True, pid=os.getpid(), details=details)
        await msg.respond(codec.encode(reply))

    if mode != "silent":
        await nc.subscribe(subjects.health(name), queue=name, cb=on_health)
    if name == "gateway":  # the gateway must answer HTTP too

        async def on_http(reader, writer):
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}")
            await writer.drain()
            writer.close()

        port = int(os.environ["DUANFLOW_GATEWAY_HTTP_PORT"])
        await asyncio.start_server(on_http, os.environ["DUANFLOW_GATEWAY_HTTP_HOST"], port)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await nc.drain()


asyncio.run(main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else ""))
'''


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private DUANFLOW_HOME, and no NATS override leaking in from the environment."""
    home = tmp_path / "home"
    monkeypatch.setenv("DUANFLOW_HOME", str(home))
    for var in ("DUANFLOW_NATS_URL", "DUANFLOW_NATS_USER", "DUANFLOW_NATS_PASSWORD", "DUANFLOW_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    return home


@pytest.fixture
def data_dir(home: Path) -> Iterator[Path]:
    """A data dir whose stack is always stopped at the end, even when the test failed half way."""
    d = home / "stack-data"
    yield d
    Stack.down(d, grace=2.0)


@pytest.fixture
def fake(tmp_path: Path) -> Path:
    """The fake service script."""
    path = tmp_path / "fake_service.py"
    path.write_text(FAKE_SERVICE)
    return path


def fake_commands(script: Path, **modes: str) -> dict[str, list[str]]:
    """argv of every service replaced by the fake responder (``modes``: name → replica/silent)."""
    return {name: [sys.executable, str(script), name, modes.get(name, "")] for name in SERVICES}


def pids_under(data_dir: Path, stack_id: str) -> set[int]:
    """Every live process of a stack: marked with its id, or naming its data dir on the command line."""
    found = processes.marked(stack_id)
    for proc in psutil.process_iter(["cmdline"]):
        if any(str(data_dir) in part for part in proc.info["cmdline"] or ()):
            found.add(proc.pid)
    return {p for p in found if processes.is_running(p)}


def live_with_data_dir(data_dir: Path) -> set[int]:
    """Live processes whose command line names ``data_dir``."""
    found = set()
    for proc in psutil.process_iter(["cmdline"]):
        if any(str(data_dir) in part for part in proc.info["cmdline"] or ()):
            found.add(proc.pid)
    return {p for p in found if p != os.getpid() and processes.is_running(p)}


def test_infra_only_stack_keeps_credentials_0600_across_restarts(data_dir: Path) -> None:
    state = Stack.up(data_dir, services=())
    creds_path = data_dir / CREDENTIALS_FILE
    assert stat.S_IMODE(creds_path.stat().st_mode) == 0o600
    first = json.loads(creds_path.read_text())
    assert set(first["nats"]) == {"client", "agent", "service"}
    assert first["s3_access_key"] and first["s3_secret_key"] and first["secret_key"]

    profile = _config.current("local")
    assert profile.nats_url == state.nats_url
    assert profile.nats_user == "client"
    assert profile.nats_password == first["nats"]["client"]
    assert profile.s3_endpoint == state.s3_endpoint
    assert stat.S_IMODE(_config.config_path().stat().st_mode) == 0o600

    st = Stack.status(data_dir)
    assert st.healthy, st.to_dict()
    assert set(st.components) == {"nats", "postgres", "s3"}

    assert sorted(Stack.down(data_dir)) == ["nats", "postgres", "s3"]
    assert not (data_dir / STATE_FILE).exists()

    Stack.up(data_dir, services=())  # same data dir: same secrets, and the servers accept them
    assert json.loads(creds_path.read_text()) == first
    assert Stack.status(data_dir).healthy


def test_second_up_is_refused_and_says_how_to_stop(data_dir: Path) -> None:
    Stack.up(data_dir, services=())
    with pytest.raises(StackRunningError, match="duanflow dev down"):
        Stack.up(data_dir, services=())

    result = CliRunner().invoke(dev_app, ["up", "--detach", "--data-dir", str(data_dir)])
    assert result.exit_code == 1
    assert "already running" in result.output
    assert "duanflow dev down" in result.output
    assert Stack.status(data_dir).healthy  # the first stack is untouched


def test_stale_state_file_with_dead_pids_is_ignored(data_dir: Path) -> None:
    data_dir.mkdir(parents=True)
    dead = psutil.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    save_state(
        StackState(
            data_dir=str(data_dir),
            stack_id="stale",
            status="running",
            components={
                "nats": ComponentState(name="nats", kind="server", pid=dead.pid, create_time=1.0, address="x", log="x")
            },
        )
    )
    assert Stack.running(data_dir) is None
    state = Stack.up(data_dir, services=())
    assert state.stack_id != "stale"


def test_fake_services_healthy_then_down_leaves_no_process(data_dir: Path, fake: Path) -> None:
    state = Stack.up(data_dir, commands=fake_commands(fake, agent="replica"), timeout=60)
    assert list(state.components) == ["nats", "postgres", "s3", *SERVICES]
    assert state.gateway_url.startswith("http://127.0.0.1:")
    logs = {Path(c.log).parent for c in state.components.values()}
    assert logs == {data_dir / "logs"}

    # each service gets its settings from the stack, with its NATS role; replicas get the agent role
    creds = json.loads((data_dir / CREDENTIALS_FILE).read_text())
    agent_env = psutil.Process(state.components["agent"].pid).environ()
    assert agent_env["DUANFLOW_NATS_USER"] == "agent"
    assert agent_env["DUANFLOW_AGENT_REPLICA_NATS_USER"] == "agent"
    assert agent_env["DUANFLOW_AGENT_REPLICA_NATS_PASSWORD"] == creds["nats"]["agent"]
    assert agent_env["DUANFLOW_AGENT_WORK_DIR"].startswith(str(data_dir))
    router_env = psutil.Process(state.components["router"].pid).environ()
    assert router_env["DUANFLOW_NATS_USER"] == "service"
    assert router_env["DUANFLOW_NATS_PASSWORD"] == creds["nats"]["service"]
    assert router_env["DUANFLOW_ROUTER_DATABASE_URL"] == state.postgres_dsn
    assert "DUANFLOW_HOME" not in router_env  # nothing of the caller's DUANFLOW_* leaks into a service

    result = CliRunner().invoke(dev_app, ["status", "--json", "--data-dir", str(data_dir)])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["healthy"] is True
    assert all(c["healthy"] for c in report["components"].values()), report
    assert report["components"]["agent"]["pid"] == state.components["agent"].pid
    if state.simulated:
        assert report["components"]["agent"]["simulated"] is True

    # the agent's "replica" runs in a session of its own without the stack's marker: found by its working dir
    replica = eventually_sync(
        lambda: [p for p in processes.descendants(state.components["agent"].pid) if p != state.components["agent"].pid]
    )
    before = pids_under(data_dir, state.stack_id) | set(replica)
    assert len(before) >= 9

    # the agent crashes: its replica is orphaned, and `down` must still find and stop it
    agent = psutil.Process(state.components["agent"].pid)
    agent.kill()
    agent.wait(10)
    assert all(processes.is_running(p) for p in replica)

    result = CliRunner().invoke(dev_app, ["down", "--data-dir", str(data_dir)])
    assert result.exit_code == 0, result.output
    assert "Stopped" in result.output
    left = {p for p in before if processes.is_running(p)}
    assert not left, [psutil.Process(p).cmdline() for p in left]

    again = CliRunner().invoke(dev_app, ["down", "--data-dir", str(data_dir)])
    assert again.exit_code == 0
    assert "Nothing running" in again.output

    st = CliRunner().invoke(dev_app, ["status", "--data-dir", str(data_dir)])
    assert st.exit_code == 1
    assert "duanflow dev up" in st.output


def test_service_that_cannot_start_is_named_with_its_log_and_stack_torn_down(data_dir: Path, fake: Path) -> None:
    commands = fake_commands(fake)
    commands["builder"] = [sys.executable, "-m", "duanflow_builder_does_not_exist"]
    with pytest.raises(ComponentStartError) as info:
        Stack.up(data_dir, commands=commands, timeout=60)
    err = info.value
    assert err.component == "builder"
    assert err.log_path == data_dir / "logs" / "builder.log"
    assert str(err.log_path) in str(err)
    assert "No module named" in str(err)  # the log's last lines come with it
    assert not (data_dir / STATE_FILE).exists()
    assert not live_with_data_dir(data_dir)


def test_service_that_never_turns_healthy_times_out_and_cli_names_it(
    data_dir: Path, fake: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    commands = fake_commands(fake, logs="silent")
    with pytest.raises(ComponentStartError, match="logs failed to start: not healthy within 3s") as info:
        Stack.up(data_dir, commands=commands, timeout=3)
    assert info.value.log_path == data_dir / "logs" / "logs.log"
    assert not live_with_data_dir(data_dir)

    # the CLI says the same, in its words, and exits 1
    from duanflow._local import stack as stack_mod

    real_up = stack_mod.Stack.up

    def up_with_a_port_taken(data_dir: Path | None = None, **kw: object) -> StackState:
        return real_up(data_dir, commands={"router": [sys.executable, "-c", "raise SystemExit('port 1 in use')"]},
                       services=("router",), timeout=10)  # fmt: skip

    monkeypatch.setattr(stack_mod.Stack, "up", staticmethod(up_with_a_port_taken))
    result = CliRunner().invoke(dev_app, ["up", "--detach", "--data-dir", str(data_dir)])
    assert result.exit_code == 1
    assert "router failed to start" in result.output
    assert str(data_dir / "logs" / "router.log") in result.output
    assert "port 1 in use" in result.output
    assert not live_with_data_dir(data_dir)


def test_status_without_a_stack_exits_1_and_says_dev_up(data_dir: Path) -> None:
    result = CliRunner().invoke(dev_app, ["status", "--json", "--data-dir", str(data_dir)])
    assert result.exit_code == 1
    assert json.loads(result.output) == {
        "healthy": False,
        "running": False,
        "data_dir": str(data_dir),
        "components": {},
    }
    down = CliRunner().invoke(dev_app, ["down", "--data-dir", str(data_dir)])
    assert down.exit_code == 0
    assert "Nothing running" in down.output


@pytest.mark.timeout(300)
def test_real_stack_through_the_cli_up_status_refused_down_and_restart(tmp_path: Path) -> None:
    """The real services, started by ``duanflow dev up --detach`` as a user runs it, and stopped without orphans."""
    from e2e.stackcli import alive, cli, in_dir, stack_pids, stopped_at_exit

    home, data = tmp_path / "home", tmp_path / "data"
    with stopped_at_exit(home, data):
        up = cli(home, "dev", "up", "--detach", "--data-dir", data, timeout=240)
        assert up.returncode == 0, up.stdout + up.stderr
        assert "Traceback" not in up.stderr
        for name in ("nats", "postgres", "s3", *SERVICES):
            assert name in up.stdout  # the table of where everything is
        profile = (home / "config.toml").read_text()
        assert "[profiles.local]" in profile and 'nats_user = "client"' in profile

        status = cli(home, "dev", "status", "--json", "--data-dir", data)
        assert status.returncode == 0, status.stdout + status.stderr
        report = json.loads(status.stdout)
        assert report["healthy"] is True, report
        assert set(report["components"]) == {"nats", "postgres", "s3", *SERVICES}
        assert all(c["healthy"] and c["pid"] > 0 and c["address"] for c in report["components"].values()), report
        state = json.loads((data / STATE_FILE).read_text())
        if state["simulated"]:
            assert report["components"]["agent"]["simulated"] is True

        # `auth login` checks the credentials against the server before it saves a profile
        url, token = state["nats_url"], json.loads((data / CREDENTIALS_FILE).read_text())["nats"]["client"]
        wrong = cli(home, "auth", "login", "--server", url, "--token", "wrong", "--profile", "other")
        assert wrong.returncode == 1 and "Authorization Violation" in wrong.stderr, wrong.stderr
        login = cli(home, "auth", "login", "--server", url, "--token", token, "--profile", "other")
        assert login.returncode == 0, login.stdout + login.stderr
        listed = cli(home, "auth", "status")
        assert "● other" in listed.stdout and "local" in listed.stdout
        assert token not in listed.stdout

        second = cli(home, "dev", "up", "--detach", "--data-dir", data)
        assert second.returncode == 1
        assert "already running" in second.stderr and "duanflow dev down" in second.stderr

        before = stack_pids(data, state)
        assert len(before) >= 8
        down = cli(home, "dev", "down", "--data-dir", data)
        assert down.returncode == 0, down.stdout + down.stderr
        assert "Stopped the local stack" in down.stdout
        assert not alive(before), [psutil.Process(p).cmdline() for p in alive(before)]
        assert not alive(in_dir(data))
        assert not (data / STATE_FILE).exists()
        again = cli(home, "dev", "down", "--data-dir", data)
        assert again.returncode == 0 and "Nothing running" in again.stdout

        # --data-dir keeps state: the same Postgres cluster and credentials come back up
        pg_version = (data / "postgres" / "pgdata" / "PG_VERSION").read_text()
        creds = (data / CREDENTIALS_FILE).read_text()
        up = cli(home, "dev", "up", "--detach", "--data-dir", data, "--json", timeout=240)
        assert up.returncode == 0, up.stdout + up.stderr
        assert json.loads(up.stdout)["healthy"] is True
        assert (data / "postgres" / "pgdata" / "PG_VERSION").read_text() == pg_version
        assert (data / CREDENTIALS_FILE).read_text() == creds


@pytest.mark.timeout(180)
def test_real_agent_with_a_bad_setting_is_named_with_its_log_and_the_stack_torn_down(tmp_path: Path) -> None:
    from e2e.stackcli import alive, cli, in_dir, stopped_at_exit

    home, data = tmp_path / "home", tmp_path / "data"
    with stopped_at_exit(home, data):
        up = cli(
            home, "dev", "up", "--detach", "--data-dir", data, timeout=150, env={"DUANFLOW_AGENT_PRICES": "{not json"}
        )
        assert up.returncode == 1, up.stdout + up.stderr
        assert "agent failed to start" in up.stderr
        assert str(data / "logs" / "agent.log") in up.stderr
        assert "DUANFLOW_AGENT_PRICES" in up.stderr  # the log's last lines say why
        assert "Traceback" not in up.stderr
        assert not (data / STATE_FILE).exists()
        assert not alive(in_dir(data))


def test_cli_errors_for_a_missing_function_and_a_syntax_error_exit_1_without_traceback(tmp_path: Path) -> None:
    from e2e.stackcli import cli

    (tmp_path / "cli_app.py").write_text(
        'import duanflow as df\n\napp = df.App("cli-errors")\n\n\n@app.function()\ndef f(x: int):\n    return x\n'
    )
    (tmp_path / "cli_broken.py").write_text("import duanflow as df\n\nif True\n    pass\n")
    home = tmp_path / "home"
    cases: list[tuple[tuple[str | Path, ...], str]] = [
        (("run", f"{tmp_path / 'cli_app.py'}::nope"), "has no function 'nope'"),
        (("run", f"{tmp_path / 'cli_broken.py'}::f"), "cli_broken.py:3: syntax error"),
        (("deploy", tmp_path / "cli_broken.py"), "syntax error"),
        (("run", f"{tmp_path / 'cli_app.py'}::f", "--x", "one"), "--x takes an integer"),
        (("run", f"{tmp_path / 'cli_app.py'}::f", "--x", "1"), "duanflow dev up"),  # no stack, no profile
    ]
    for args, expected in cases:
        result = cli(home, *args, timeout=60)
        assert result.returncode == 1, (args, result.stdout, result.stderr)
        assert expected in result.stderr, (args, result.stderr)
        assert "Traceback" not in result.stdout + result.stderr


@pytest.mark.timeout(300)
def test_foreground_up_stops_everything_on_ctrl_c(tmp_path: Path) -> None:
    import signal
    import subprocess

    from e2e.stackcli import REPO, alive, cli, in_dir, stack_pids, stopped_at_exit, user_env

    home, data = tmp_path / "home", tmp_path / "data"
    with stopped_at_exit(home, data):
        fg = subprocess.Popen(
            [sys.executable, "-m", "duanflow._cli", "dev", "up", "--data-dir", str(data)],
            cwd=REPO,
            env=user_env(home),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        try:

            def healthy() -> bool:
                assert fg.poll() is None, fg.stdout.read() if fg.stdout else ""
                st = cli(home, "dev", "status", "--json", "--data-dir", data, timeout=30)
                return st.returncode == 0 and json.loads(st.stdout)["healthy"]

            eventually_sync(healthy, timeout=180, interval=0.5)
            state = json.loads((data / STATE_FILE).read_text())
            assert state["owner_pid"] == fg.pid
            before = stack_pids(data, state)
            fg.send_signal(signal.SIGINT)  # Ctrl-C
            output, _ = fg.communicate(timeout=90)
        finally:
            if fg.poll() is None:
                fg.kill()
        assert fg.returncode == 0, output
        assert "Local stack stopped" in output
        assert "Traceback" not in output
        assert not alive(before - {fg.pid})
        assert not alive(in_dir(data))
        assert not (data / STATE_FILE).exists()

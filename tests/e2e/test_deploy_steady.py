"""A deploy under load: calls made while a new release replaces the old one all succeed.

The router starts the new release's replicas and waits until they are ready before it stops the old ones, which
hand back whatever they had not started; a caller looping on ``.remote()`` meanwhile must see no failure and no
call that never returns.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import nats
import pytest
from duanflow_proto import subjects
from e2e.stackcli import REPO, cli, stopped_at_exit, user_env

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(420)]

APP = """import duanflow as df

app = df.App("steady")


@app.function()
def echo(x: int) -> int:
    return x
"""

CALLER = """
import json, pathlib, sys
import duanflow as df
echo = df.Function.from_name("steady", "echo")
stop = pathlib.Path(sys.argv[1])
ok, failed, n = 0, [], 0
assert echo.remote(-1) == -1
print("calling", flush=True)
while not stop.exists():
    n += 1
    try:
        assert echo.remote(n) == n
        ok += 1
    except Exception as exc:
        failed.append(f"{type(exc).__name__}: {exc}")
print(json.dumps({"ok": ok, "failed": failed[:5]}))
"""

STRANDED_S = 60.0
"""A call still unanswered this long after the deploy finished was stranded (an input nobody will run)."""


async def consumer_state(data: Path) -> dict[str, object]:
    """Delivery counters of the function's consumer, read with the stack's service role (for the failure message)."""
    creds = json.loads((data / "credentials.json").read_text())
    state = json.loads((data / "stack.json").read_text())
    nc = await nats.connect(state["nats_url"], user="service", password=creds["nats"]["service"])
    try:
        info = await nc.jetstream().consumer_info(
            subjects.STREAM_INVOCATIONS, subjects.consumer_name("main", "steady", "echo")
        )
        return {
            "num_ack_pending": info.num_ack_pending,
            "num_pending": info.num_pending,
            "num_waiting": info.num_waiting,
            "num_redelivered": info.num_redelivered,
            "ack_wait_s": info.config.ack_wait,
        }
    finally:
        await nc.close()


def test_calls_during_deploys_all_succeed(tmp_path: Path) -> None:
    home, data = tmp_path / "home", tmp_path / "data"
    src = tmp_path / "app" / "steady_app.py"
    src.parent.mkdir()
    src.write_text(APP)
    with stopped_at_exit(home, data):
        up = cli(home, "dev", "up", "--detach", "--data-dir", data, timeout=240)
        assert up.returncode == 0, up.stdout + up.stderr
        first = cli(home, "deploy", src, "--json", timeout=300)
        assert first.returncode == 0, first.stdout + first.stderr
        stop_file = tmp_path / "stop-calling"
        caller = subprocess.Popen(
            [sys.executable, "-c", CALLER, str(stop_file)],
            cwd=REPO,
            env=user_env(home),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            assert caller.stdout is not None
            assert caller.stdout.readline().strip() == "calling"
            releases = {json.loads(first.stdout)["release"]}
            for n in range(2):
                src.write_text(APP + f"\n# version {n + 2}\n")
                again = cli(home, "deploy", src, "--json", timeout=300)
                assert again.returncode == 0, again.stdout + again.stderr
                releases.add(json.loads(again.stdout)["release"])
            assert len(releases) == 3
        finally:
            stop_file.touch()
            try:
                out, errs = caller.communicate(timeout=STRANDED_S)
            except subprocess.TimeoutExpired:
                caller.kill()
                out, errs = caller.communicate()
                pytest.fail(
                    "a call made during the deploys never returned (a stranded input); the consumer: "
                    f"{asyncio.run(consumer_state(data))}; caller: {errs[-1500:]}"
                )
        counts = json.loads(out.strip().splitlines()[-1])
        assert counts["failed"] == [], (counts, errs)
        assert counts["ok"] >= 10, counts

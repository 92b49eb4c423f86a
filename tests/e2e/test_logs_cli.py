"""``duanflow logs`` on the whole local stack, as the product page writes it: a replica's prints and Python
logging records (with their level), scheduler lines, ``--follow`` showing a new line, and clear errors."""

from __future__ import annotations

import json
import queue
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from e2e.stackcli import REPO, cli, stopped_at_exit, user_env

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(420)]

LG_APP = textwrap.dedent(
    """
    import logging

    import duanflow as df

    app = df.App("logs-e2e")
    log = logging.getLogger("shop")


    @app.function(timeout=60)
    def checkout(order: str) -> str:
        print(f"checking out {order}")
        log.warning("stock low for %s", order)
        return order.upper()
    """
)


def test_logs_of_an_app_history_follow_and_errors(tmp_path: Path) -> None:
    home, data = tmp_path / "home", tmp_path / "data"
    app_file = tmp_path / "shop.py"
    app_file.write_text(LG_APP)
    with stopped_at_exit(home, data):
        up = cli(home, "dev", "up", "--detach", "--data-dir", data, timeout=240)
        assert up.returncode == 0, up.stdout + up.stderr
        run = cli(home, "run", f"{app_file}::checkout", "--order", "o-1", timeout=300)
        assert run.returncode == 0, run.stdout + run.stderr

        def runtime_lines() -> list[dict[str, str]]:
            out = cli(home, "logs", "logs-e2e", "--kind", "runtime", "--since", "30m", "--json", timeout=60)
            assert out.returncode == 0, out.stdout + out.stderr
            return [json.loads(line) for line in out.stdout.splitlines()]

        deadline = time.monotonic() + 30
        lines = runtime_lines()
        while not any("stock low for o-1" in ln["message"] for ln in lines) and time.monotonic() < deadline:
            lines = runtime_lines()
        printed = [ln for ln in lines if ln["message"] == "checking out o-1"]
        logged = [ln for ln in lines if ln["message"].endswith("stock low for o-1")]
        assert printed and printed[0]["level"] == "info" and printed[0]["function"] == "checkout"
        assert logged and logged[0]["level"] == "warning" and "\x02" not in logged[0]["message"]

        scheduler = cli(home, "logs", "logs-e2e", "--kind", "scheduler", "--since", "30m", timeout=60)
        assert scheduler.returncode == 0 and "[scheduler]" in scheduler.stdout, scheduler.stdout + scheduler.stderr
        only = cli(home, "logs", "logs-e2e", "--since", "30m", "--search", "STOCK LOW", "--json", timeout=60)
        assert {json.loads(ln)["kind"] for ln in only.stdout.splitlines()} == {"runtime"}

        follow = subprocess.Popen(
            [sys.executable, "-m", "duanflow._cli", "logs", "logs-e2e", "--follow", "--json", "--function", "checkout"],
            cwd=REPO,
            env=user_env(home),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            again = cli(home, "run", f"{app_file}::checkout", "--order", "o-2", timeout=300)
            assert again.returncode == 0, again.stdout + again.stderr
            assert follow.stdout is not None
            shown: queue.Queue[str] = queue.Queue()

            def pump() -> None:
                for text in follow.stdout or ():
                    shown.put(text)

            threading.Thread(target=pump, daemon=True).start()
            seen: list[str] = []
            while "checking out o-2" not in seen:
                seen.append(json.loads(shown.get(timeout=30))["message"])
        finally:
            follow.terminate()
            follow.wait(10)

        unknown = cli(home, "logs", "no-such-app", timeout=60)
        assert unknown.returncode == 1 and "unknown app 'no-such-app'" in unknown.stderr
        assert "logs-e2e" in unknown.stderr  # the apps that exist
        bad = cli(home, "logs", "logs-e2e", "--since", "yesterday", timeout=60)
        assert bad.returncode == 1 and "--since 'yesterday'" in bad.stderr
        assert "Traceback" not in unknown.stderr + bad.stderr

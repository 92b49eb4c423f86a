"""The product page's quickstart on the whole local stack, driven as a user would: the CLI and the SDK.

``duanflow dev up`` → ``duanflow deploy examples/hello.py`` → ``duanflow run examples/hello.py::classify_ticket
--text "我的模型接口超时了"`` → ``classify_ticket.remote(...)`` from Python → ``duanflow dev down``, nothing left.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
from e2e.stackcli import REPO, alive, cli, in_dir, python, stack_pids, stopped_at_exit

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(420)]

TICKET = "我的模型接口超时了"


def test_quickstart_deploy_run_remote_down(tmp_path: Path) -> None:
    home, data = tmp_path / "home", tmp_path / "data"
    with stopped_at_exit(home, data):
        up = cli(home, "dev", "up", "--detach", "--data-dir", data, timeout=240)
        assert up.returncode == 0, up.stdout + up.stderr
        assert (home / "config.toml").exists()
        state = json.loads((data / "stack.json").read_text())

        deploy = cli(home, "deploy", "examples/hello.py", "--json", timeout=300)
        assert deploy.returncode == 0, deploy.stdout + deploy.stderr
        release = json.loads(deploy.stdout)
        assert release["app"] == "hello-gpu"
        assert release["release"].startswith("rel_")
        assert [f["name"] for f in release["functions"]] == ["classify_ticket"]
        assert "✓" in deploy.stderr  # progress went to stderr, step by step

        listed = cli(home, "releases", "hello-gpu", "--json", timeout=60)
        assert listed.returncode == 0, listed.stdout + listed.stderr
        active = [r["release"] for r in json.loads(listed.stdout)["releases"] if r["active"]]
        assert active == [release["release"]]

        run = cli(home, "run", "examples/hello.py::classify_ticket", "--text", TICKET, timeout=300)
        assert run.returncode == 0, run.stdout + run.stderr
        answer = json.loads(run.stdout)
        assert answer["label"] == "timeout"
        assert answer["input"] == TICKET
        assert "unchanged" in run.stderr  # same sources, image and spec: the active release is reused
        if state.get("simulated"):
            assert "simulated" in run.stderr

        as_json = cli(home, "run", "examples/hello.py::classify_ticket", "--text", TICKET, "--json", timeout=120)
        assert as_json.returncode == 0, as_json.stdout + as_json.stderr
        assert json.loads(as_json.stdout) == answer  # stdout is only the result; progress stays on stderr

        script = textwrap.dedent(
            f"""
            import json, sys
            sys.path.insert(0, "examples")
            from hello import classify_ticket
            print(json.dumps(classify_ticket.remote({TICKET!r}), ensure_ascii=False))
            """
        )
        remote = python(home, script, timeout=120)
        assert remote.returncode == 0, remote.stdout + remote.stderr
        assert json.loads(remote.stdout.strip().splitlines()[-1])["label"] == "timeout"

        scheduler = cli(home, "logs", "hello-gpu", "--kind", "scheduler", "--since", "10m", timeout=60)
        assert scheduler.returncode == 0, scheduler.stdout + scheduler.stderr
        assert "[scheduler]" in scheduler.stdout and "placed" in scheduler.stdout
        assert "[runtime]" not in scheduler.stdout
        runtime = cli(home, "logs", "hello-gpu", "--json", timeout=60)
        kinds = {json.loads(line)["kind"] for line in runtime.stdout.splitlines()}
        assert {"scheduler", "runtime"} <= kinds

        missing = cli(home, "run", "examples/hello.py::no_such_function", timeout=60)
        assert missing.returncode == 1
        assert "no function 'no_such_function'" in missing.stderr
        assert "Traceback" not in missing.stdout + missing.stderr

        # a changed file is a new release; a rollback runs the first one's exact content again
        changed = tmp_path / "app" / "hello.py"
        changed.parent.mkdir()
        changed.write_text((REPO / "examples" / "hello.py").read_text() + "\n# v2\n")
        second = cli(home, "deploy", changed, "--json", timeout=300)
        assert second.returncode == 0, second.stdout + second.stderr
        assert json.loads(second.stdout)["release"] != release["release"]
        back = cli(home, "rollback", "hello-gpu", "--to", release["release"], "--json", timeout=300)
        assert back.returncode == 0, back.stdout + back.stderr
        rolled = json.loads(back.stdout)
        listed = json.loads(cli(home, "releases", "hello-gpu", "--json", timeout=60).stdout)["releases"]
        active = [r for r in listed if r["active"]]
        assert [r["release"] for r in active] == [rolled["release"]]
        assert active[0]["bundle_digest"] == release["bundle_digest"]

        # a refusal from a service is one clear line too: no agent has 8 H100s
        greedy = tmp_path / "greedy_app.py"
        greedy.write_text(
            'import duanflow as df\n\napp = df.App("greedy")\n\n\n'
            '@app.function(gpu="H100", gpu_count=8)\ndef train(x: int) -> int:\n    return x\n'
        )
        refused = cli(home, "deploy", greedy, timeout=120)
        assert refused.returncode == 1, refused.stdout + refused.stderr
        assert "✗" in refused.stderr and "H100" in refused.stderr
        assert "Traceback" not in refused.stdout + refused.stderr

        # live prices as the product page sets them; a nonsense price is refused before it is sent
        priced = cli(home, "price", "set", "local-h100", "1.85", "--json", timeout=60)
        assert priced.returncode == 0, priced.stdout + priced.stderr
        assert {"pool": "local-h100", "price_per_gpu_hour": 1.85}.items() <= json.loads(priced.stdout)["prices"][
            0
        ].items()
        listed_prices = json.loads(cli(home, "price", "list", "--json", timeout=60).stdout)["prices"]
        assert [p["pool"] for p in listed_prices] == ["local-h100"]
        bad_price = cli(home, "price", "set", "local-h100", "-- -3", timeout=60)
        assert bad_price.returncode != 0 and "Traceback" not in bad_price.stderr

        before = stack_pids(data, state)
        assert len(before) >= 9  # 3 servers, 5 services, at least one replica
        down = cli(home, "dev", "down", "--data-dir", data, timeout=120)
        assert down.returncode == 0, down.stdout + down.stderr
        assert not alive(before)
        assert not alive(in_dir(data))
        assert not (data / "stack.json").exists()

        stopped = cli(home, "run", "examples/hello.py::classify_ticket", "--text", TICKET, timeout=60)
        assert stopped.returncode == 1
        assert "is the stack running" in stopped.stderr or "duanflow dev up" in stopped.stderr, stopped.stderr
        assert "Traceback" not in stopped.stdout + stopped.stderr

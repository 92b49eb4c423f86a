"""Every call style through the public SDK against the whole local stack, as a user would: ``duanflow dev up``,
``duanflow deploy`` of an app with a function, a generator and a lifecycle class, then from plain Python
processes ``.remote()``, ``.remote.aio()``, ``.map()`` / ``.starmap()``, ``.spawn()`` with
``FunctionCall.from_id(...).get()`` in another process, ``.remote_gen()``, ``Model().predict.remote()`` and
``Function.from_name``; ``duanflow run`` of a local entrypoint whose map draws a progress bar; then
``duanflow dev down``."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
from e2e.stackcli import cli, python, stopped_at_exit

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

APP = """
import duanflow as df

app = df.App("e2e-calls")


@app.function(timeout=60)
def square(x: int) -> int:
    return x * x


@app.function(timeout=60)
def add(a: int, b: int) -> int:
    return a + b


@app.function(timeout=60)
def countdown(n: int):
    yield from range(n, 0, -1)


@app.local_entrypoint()
def main(n: int = 10) -> int:
    return sum(square.map(range(n)))


@app.cls(timeout=60)
class Model:
    @df.enter()
    def load(self) -> None:
        self.loads = getattr(self, "loads", 0) + 1

    @df.method()
    def predict(self, x: int) -> list[int]:
        return [x * 2, self.loads]
"""

CALLS = """
import asyncio, json, sys
sys.path.insert(0, {app_dir!r})
import duanflow as df
from e2e_calls_app import square, add, countdown, Model

async def aio():
    return await square.remote.aio(7), [x async for x in square.map.aio(range(5))]

out = {{
    "remote": square.remote(3),
    "aio": asyncio.run(aio()),
    "map": list(square.map(range(200))) == [x * x for x in range(200)],
    "starmap": list(add.starmap([(1, 2), (3, 4)])),
    "gen": list(countdown.remote_gen(4)),
    "cls": [Model().predict.remote(21) for _ in range(3)],
    "from_name": df.Function.from_name("e2e-calls", "square").remote(9),
    "spawned": square.spawn(12).object_id,
}}
print(json.dumps(out))
"""

GET = """
import json
import duanflow as df
print(json.dumps(df.FunctionCall.from_id({call_id!r}).get(timeout=60)))
"""


def test_every_call_style_against_the_local_stack(tmp_path: Path) -> None:
    home, data, app_dir = tmp_path / "home", tmp_path / "data", tmp_path / "app"
    app_dir.mkdir()
    app_file = app_dir / "e2e_calls_app.py"
    app_file.write_text(textwrap.dedent(APP))
    with stopped_at_exit(home, data):
        up = cli(home, "dev", "up", "--detach", "--data-dir", data, timeout=240)
        assert up.returncode == 0, up.stdout + up.stderr
        deploy = cli(home, "deploy", app_file, "--json", timeout=300)
        assert deploy.returncode == 0, deploy.stdout + deploy.stderr
        assert {f["name"] for f in json.loads(deploy.stdout)["functions"]} == {"square", "add", "countdown", "Model"}

        calls = python(home, CALLS.format(app_dir=str(app_dir)), timeout=240)
        assert calls.returncode == 0, calls.stdout + calls.stderr
        out = json.loads(calls.stdout.strip().splitlines()[-1])
        assert out["remote"] == 9
        assert out["aio"] == [49, [0, 1, 4, 9, 16]]
        assert out["map"] is True
        assert out["starmap"] == [3, 7]
        assert out["gen"] == [4, 3, 2, 1]
        assert out["cls"] == [[42, 1]] * 3, "one @enter for every call of the replica"
        assert out["from_name"] == 81

        got = python(home, GET.format(call_id=out["spawned"]), timeout=120)
        assert got.returncode == 0, got.stdout + got.stderr
        assert json.loads(got.stdout.strip().splitlines()[-1]) == 144

        # A local entrypoint runs in the CLI; its 100,000-input map draws a progress bar on stderr.
        run = cli(home, "run", f"{app_file}::main", "--n", "100000", timeout=240)
        assert run.returncode == 0, run.stdout + run.stderr
        assert run.stdout.strip().splitlines()[-1] == str(sum(x * x for x in range(100_000)))
        assert "square.map()" in run.stderr and "100000/100000" in run.stderr, run.stderr

        down = cli(home, "dev", "down", "--data-dir", data, timeout=120)
        assert down.returncode == 0, down.stdout + down.stderr

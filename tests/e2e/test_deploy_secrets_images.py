"""Deploys as a user makes them, on the whole local stack: secrets, a venv image, bad input, apps and stop.

One stack for the lot (starting one is the slow part). The image installs a wheel the test writes itself, so
the venv build needs no package index: build → pack to S3 → agent downloads and caches → the replica imports it.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import time
import tomllib
import zipfile
from pathlib import Path

import nats
import pytest
from duanflow_proto import codec, subjects
from duanflow_proto.messages.logs import LogLine
from e2e.stackcli import cli, stopped_at_exit
from nats.js.api import DeliverPolicy

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

TOKEN = "hf_e2eSecretValue_31337"


async def read_logs(profile: dict[str, str], env: str, app: str) -> list[LogLine]:
    """Every line of one app on the logs stream, read as the client role (the CLI's own credentials)."""
    nc = await nats.connect(profile["nats_url"], user=profile["nats_user"], password=profile["nats_password"])
    try:
        sub = await nc.jetstream().subscribe(
            subjects.logs_filter(env, app),
            stream=subjects.STREAM_LOGS,
            ordered_consumer=True,
            deliver_policy=DeliverPolicy.ALL,
        )
        out: list[LogLine] = []
        while True:
            try:
                msg = await sub.next_msg(timeout=5)
            except TimeoutError:
                return out
            out.append(codec.decode(msg.data, LogLine))
            if msg.metadata.num_pending == 0:
                return out
    finally:
        await nc.close()


def make_wheel(where: Path, value: str) -> Path:
    """A minimal pure-Python wheel of package ``dfprobe`` whose ``VALUE`` is ``value``."""
    files = {
        "dfprobe/__init__.py": f"VALUE = {value!r}\n".encode(),
        "dfprobe-0.1.dist-info/METADATA": b"Metadata-Version: 2.1\nName: dfprobe\nVersion: 0.1\n",
        "dfprobe-0.1.dist-info/WHEEL": (
            b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        ),
    }
    record = []
    for name, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{name},sha256={digest},{len(data)}")
    record.append("dfprobe-0.1.dist-info/RECORD,,")
    path = where / "dfprobe-0.1-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
        zf.writestr("dfprobe-0.1.dist-info/RECORD", "\n".join(record) + "\n")
    return path


def app_file(folder: Path, name: str, body: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.py"
    path.write_text(body)
    return path


def ok(result: object) -> str:
    stdout, stderr, rc = result.stdout, result.stderr, result.returncode  # type: ignore[attr-defined]
    assert rc == 0, stdout + stderr
    return str(stdout)


def refused(result: object, *needles: str) -> str:
    text = str(result.stdout) + str(result.stderr)  # type: ignore[attr-defined]
    assert result.returncode == 1, text  # type: ignore[attr-defined]
    assert "Traceback" not in text, text
    for needle in needles:
        assert needle in text, text
    return text


def test_secrets_images_bad_input_apps_stop(tmp_path: Path) -> None:
    home, data = tmp_path / "home", tmp_path / "data"
    wheel = make_wheel(tmp_path, "from-the-image")
    with stopped_at_exit(home, data):
        ok(cli(home, "dev", "up", "--detach", "--data-dir", data, timeout=240))

        # ---- secrets: create (args and dotenv), list shows names only
        created = cli(home, "secret", "create", "hf-prod", f"HF_TOKEN={TOKEN}")
        assert TOKEN not in ok(created) + created.stderr
        dotenv = tmp_path / ".env"
        dotenv.write_text("# extra\nexport EXTRA_ONE=1111\nEXTRA_TWO='two two'\n")
        ok(cli(home, "secret", "create", "extras", "--from-dotenv", dotenv))
        listed = json.loads(ok(cli(home, "secret", "list", "--json")))
        assert {s["name"]: s["keys"] for s in listed["secrets"]} == {
            "extras": ["EXTRA_ONE", "EXTRA_TWO"],
            "hf-prod": ["HF_TOKEN"],
        }
        assert TOKEN not in json.dumps(listed) and "two two" not in json.dumps(listed)

        # ---- an app with a venv image, secrets and plain env
        body = (
            "import os\n\nimport duanflow as df\n\n"
            f"image = df.Image.debian_slim().pip_install({str(wheel)!r}).env({{'IMAGE_VAR': 'baked'}})\n"
            'app = df.App("secapp", image=image, secrets=[df.Secret.from_name("hf-prod"), '
            'df.Secret.from_name("extras")], env={"GREETING": "hi"})\n\n\n'
            "@app.function()\n"
            "def probe() -> dict:\n"
            "    import dfprobe\n\n"
            '    print("the token is", os.environ["HF_TOKEN"], flush=True)\n'
            '    keys = ("HF_TOKEN", "EXTRA_ONE", "EXTRA_TWO", "GREETING", "IMAGE_VAR")\n'
            '    return {**{k: os.environ.get(k) for k in keys}, "probe": dfprobe.VALUE, "at": dfprobe.__file__}\n'
        )
        src = app_file(tmp_path / "secapp", "secapp", body)
        first = json.loads(ok(cli(home, "deploy", src, "--json", timeout=300)))
        assert first["image_status"] == "built" and first["image_id"].startswith("im-")
        second = json.loads(ok(cli(home, "deploy", src, "--json", timeout=300)))
        assert second["image_status"] == "cached" and second["image_id"] == first["image_id"]  # nothing built
        assert second["release"] != first["release"]

        got = json.loads(ok(cli(home, "run", f"{src}::probe", "--json", timeout=300)))
        assert got["HF_TOKEN"] == TOKEN and got["EXTRA_ONE"] == "1111" and got["EXTRA_TWO"] == "two two"
        assert got["GREETING"] == "hi" and got["IMAGE_VAR"] == "baked"
        assert got["probe"] == "from-the-image" and "/images/im-" in got["at"]

        # the replica printed the token: the logs stream carries it masked, never the value
        local = tomllib.loads((home / "config.toml").read_text())["profiles"]["local"]
        deadline = time.monotonic() + 60
        lines: list[LogLine] = []
        while time.monotonic() < deadline:
            lines = asyncio.run(read_logs(local, "main", "secapp"))
            if any("the token is" in line.message for line in lines):
                break
        assert any("the token is ***" in line.message for line in lines), lines
        assert not [line for line in lines if TOKEN in repr(line)]
        assert {"build", "runtime", "scheduler"} <= {line.kind for line in lines}

        src.write_text(body + "\n# v2: a new bundle, so a new release\n")
        third = json.loads(ok(cli(home, "deploy", src, "--json", timeout=300)))
        assert third["image_status"] == "cached" and third["release"] != second["release"]
        second = third

        # ---- releases and rollback: the first release itself becomes active again, nothing is built
        releases = json.loads(ok(cli(home, "releases", "secapp", "--json")))["releases"]
        assert [r["release"] for r in releases if r["active"]] == [second["release"]]
        back = json.loads(ok(cli(home, "rollback", "secapp", "--to", first["release"], "--json", timeout=300)))
        assert back["release"] == back["rolled_back_to"] == first["release"]
        after = json.loads(ok(cli(home, "releases", "secapp", "--json")))["releases"]
        assert len(after) == len(releases) and [r["release"] for r in after if r["active"]] == [first["release"]]
        assert json.loads(ok(cli(home, "run", f"{src}::probe", "--json", timeout=300)))["HF_TOKEN"] == TOKEN
        refused(cli(home, "rollback", "secapp", "--to", "rel_19990101_0000"), "no release 'rel_19990101_0000'")

        # ---- apps, stop
        apps = json.loads(ok(cli(home, "apps", "--json")))["apps"]
        assert "secapp" in {a["app"] for a in apps}
        stopped = ok(cli(home, "stop", "secapp", timeout=120))
        assert "Stopped" in stopped
        assert "secapp" not in {a["app"] for a in json.loads(ok(cli(home, "apps", "--json")))["apps"]}
        refused(cli(home, "stop", "secapp"), "not running")

        # ---- a deploy naming a missing secret fails naming it, and leaves no release
        missing = app_file(
            tmp_path / "missing",
            "missing_secret",
            'import duanflow as df\n\napp = df.App("missingsec", secrets=[df.Secret.from_name("nope-prod")])\n\n\n'
            "@app.function()\ndef f() -> int:\n    return 1\n",
        )
        refused(cli(home, "deploy", missing, timeout=120), "nope-prod", "duanflow secret create")
        refused(cli(home, "releases", "missingsec"), "no releases")

        # ---- apt_install under the process runtime: the docker runtime is named, no release
        apt = app_file(
            tmp_path / "apt",
            "apt_app",
            'import duanflow as df\n\napp = df.App("aptapp", image=df.Image.debian_slim().apt_install("ffmpeg"))\n\n\n'
            "@app.function()\ndef f() -> int:\n    return 1\n",
        )
        refused(cli(home, "deploy", apt, timeout=120), "apt_install", "docker runtime")
        refused(cli(home, "releases", "aptapp"), "no releases")

        # ---- a failed build prints its log's tail and creates no release
        broken = app_file(
            tmp_path / "broken",
            "broken_build",
            "import duanflow as df\n\n"
            f"image = df.Image.debian_slim().pip_install({str(tmp_path / 'no-such-1.0-py3-none-any.whl')!r})\n"
            'app = df.App("brokenbuild", image=image)\n\n\n@app.function()\ndef f() -> int:\n    return 1\n',
        )
        refused(cli(home, "deploy", broken, timeout=300), "failed to build", "no-such")
        refused(cli(home, "releases", "brokenbuild"), "no releases")

        # ---- bad files: each a clear message
        syntax = app_file(tmp_path / "bad", "syntax_bad", "import duanflow as df\n\napp = df.App('x'\n")
        refused(cli(home, "deploy", syntax), "syntax_bad.py:3", "syntax error")
        no_app = app_file(tmp_path / "bad", "no_app", "x = 1\n")
        refused(cli(home, "deploy", no_app), "defines no duanflow.App")
        typo = app_file(
            tmp_path / "bad",
            "typo_image",
            'import duanflow as df\n\nimage = df.Image.debian_slim().pip_instal("x")\n'
            'app = df.App("typo", image=image)\n',
        )
        refused(cli(home, "deploy", typo), "typo_image.py:3", "did you mean .pip_install()")
        refused(cli(home, "run", f"{src}::nothing_here"), "no function 'nothing_here'")

        # ---- auth: a wrong token is refused by NATS itself; a right one is saved 0600 and checked
        other = tmp_path / "other-home"
        wrong = cli(other, "auth", "login", "--server", local["nats_url"], "--token", "not-the-token", timeout=60)
        refused(wrong, "uthorization")  # nats-server's "Authorization Violation"
        assert not (other / "config.toml").exists()
        ok(cli(other, "auth", "login", "--server", local["nats_url"], "--token", local["nats_password"], timeout=60))
        assert (other / "config.toml").stat().st_mode & 0o777 == 0o600
        status = ok(cli(other, "auth", "status"))
        assert "default" in status and local["nats_url"] in status and local["nats_password"] not in status
        assert "hf-prod" in ok(cli(other, "secret", "list"))

        # ---- delete: a later deploy naming it fails
        ok(cli(home, "secret", "delete", "extras"))
        refused(cli(home, "secret", "delete", "extras"), "no secret 'extras'")
        refused(cli(home, "deploy", src, timeout=120), "'extras'")

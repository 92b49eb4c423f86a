"""The product page's worker on the whole local stack: ``duanflow deploy`` of an ``@app.worker``, jobs put from
another process, each job's output written with ``df.storage.write_json`` by the replica, a failing job dead-lettered
and shown by ``duanflow queue``."""

from __future__ import annotations

import json
import textwrap
import uuid
from pathlib import Path

import pytest
from e2e.stackcli import cli, python, stopped_at_exit
from fixtures.waiting import eventually_sync

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(420)]

APP = """
import duanflow as df

app = df.App("{app}")
audio_queue = df.Queue("{queue}", max_retries=1)


@app.worker(queue=audio_queue, scale_to=2, timeout=30, retries=df.Retries(max_retries=0, initial_delay=0.05))
def transcribe_audio(job):
    if job.get("fail"):
        raise ValueError("unreadable audio: " + job["input_url"])
    transcript = {{"text": "transcript of " + job["input_url"], "job_id": df.current_job_id()}}
    return df.storage.write_json(job["output_url"], transcript)
"""


def test_a_deployed_worker_drains_its_queue_into_storage(tmp_path: Path) -> None:
    home, data, src_dir = tmp_path / "home", tmp_path / "data", tmp_path / "src"
    src_dir.mkdir()
    token = "w" + uuid.uuid4().hex[:8]
    queue = f"{token}-inbox"
    src = src_dir / f"audio_{token}.py"
    src.write_text(textwrap.dedent(APP.format(app=f"audio-{token}", queue=queue)))
    with stopped_at_exit(home, data):
        up = cli(home, "dev", "up", "--detach", "--data-dir", data, timeout=240)
        assert up.returncode == 0, up.stdout + up.stderr
        deploy = cli(home, "deploy", src, "--json", timeout=300)
        assert deploy.returncode == 0, deploy.stdout + deploy.stderr

        script = textwrap.dedent(
            f"""
            import json, sys
            sys.path.insert(0, {str(src_dir)!r})
            from audio_{token} import audio_queue
            ids = audio_queue.put_many([
                {{"input_url": f"s3://in/{{n}}.wav", "output_url": f"out/{token}/{{n}}.json"}} for n in range(20)
            ])
            bad = audio_queue.put({{"input_url": "s3://in/bad.wav", "fail": True}})
            print(json.dumps({{"ids": ids, "bad": bad}}))
            """
        )
        put = python(home, script, timeout=120)
        assert put.returncode == 0, put.stdout + put.stderr
        ids = json.loads(put.stdout.strip().splitlines()[-1])

        def inspect() -> dict[str, object]:
            shown = cli(home, "queue", "inspect", queue, "--json", timeout=60)
            assert shown.returncode == 0, shown.stdout + shown.stderr
            info: dict[str, object] = json.loads(shown.stdout)
            assert info["depth"] == 0 and info["dead"] == 1, info
            return info

        eventually_sync(inspect, timeout=120, interval=1.0)
        check = textwrap.dedent(
            f"""
            import json
            import duanflow as df
            keys = df.storage.list("out/{token}/")
            print(json.dumps({{"keys": keys, "first": df.storage.read_json("out/{token}/0.json")}}))
            """
        )
        stored = python(home, check, timeout=120)
        assert stored.returncode == 0, stored.stdout + stored.stderr
        got = json.loads(stored.stdout.strip().splitlines()[-1])
        assert len(got["keys"]) == 20
        assert got["first"] == {"text": "transcript of s3://in/0.wav", "job_id": ids["ids"][0]}

        dead = cli(home, "queue", "dead", queue, "--json", timeout=60)
        assert dead.returncode == 0, dead.stdout + dead.stderr
        letters = json.loads(dead.stdout)["dead_letters"]
        assert [(d["job_id"], d["attempts"]) for d in letters] == [(ids["bad"], 2)]
        assert "unreadable audio: s3://in/bad.wav" in letters[0]["error"]
        assert "transcribe_audio" in letters[0]["traceback"]

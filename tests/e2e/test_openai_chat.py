"""examples/chat_completions.py driven as a user would: ``duanflow dev up``, ``DUANFLOW_API_KEY=... duanflow deploy
examples/chat_completions.py``, then the official ``openai`` package against the stack's gateway: non-streaming,
``stream=True`` (SSE), and a wrong key → 401. One stack for the module; ``duanflow dev down`` at its end."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator

import openai
import pytest
from e2e.stackcli import cli, stopped_at_exit

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

API_KEY = "sk-duanflow-" + uuid.uuid4().hex


@pytest.fixture(scope="module")
def gateway_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    root = tmp_path_factory.mktemp("openai")
    home, data = root / "home", root / "data"
    with stopped_at_exit(home, data):
        up = cli(home, "dev", "up", "--detach", "--data-dir", data, timeout=240)
        assert up.returncode == 0, up.stdout + up.stderr
        deploy = cli(
            home, "deploy", "examples/chat_completions.py", "--json", timeout=300, env={"DUANFLOW_API_KEY": API_KEY}
        )
        assert deploy.returncode == 0, deploy.stdout + deploy.stderr
        assert json.loads(deploy.stdout)["app"] == "chat-completions"
        state = json.loads((data / "stack.json").read_text())
        assert state["gateway_url"].startswith("http://")
        yield str(state["gateway_url"])


@pytest.fixture
def client(gateway_url: str) -> openai.OpenAI:
    # A first call may wait for the keep_warm replica to come up: the gateway holds it until then.
    return openai.OpenAI(base_url=f"{gateway_url}/v1", api_key=API_KEY, max_retries=0, timeout=120)


def test_chat_completion(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(
        model="duanflow-qwen", messages=[{"role": "user", "content": "我的模型接口超时了"}], temperature=0.2
    )
    assert completion.object == "chat.completion"
    assert completion.choices[0].message.role == "assistant"
    assert completion.choices[0].message.content == "You said: 我的模型接口超时了"
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage is not None and completion.usage.total_tokens > 0


def test_chat_completion_stream(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="duanflow-qwen", messages=[{"role": "user", "content": "stream these words"}], stream=True
    )
    chunks = list(stream)
    assert len(chunks) >= 4
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == "You said: stream these words"
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_wrong_key_is_401(gateway_url: str) -> None:
    bad = openai.OpenAI(base_url=f"{gateway_url}/v1", api_key="sk-wrong", max_retries=0, timeout=30)
    with pytest.raises(openai.AuthenticationError) as info:
        bad.chat.completions.create(model="duanflow-qwen", messages=[{"role": "user", "content": "hi"}])
    assert info.value.status_code == 401
    assert info.value.response.headers["www-authenticate"].startswith("Bearer")

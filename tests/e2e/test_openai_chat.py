"""examples/chat_completions.py driven by the official ``openai`` package through a real gateway process and a real
replica (``python -m duanflow._runtime``) on real NATS: non-streaming, ``stream=True`` (SSE), and a wrong key → 401."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from duanflow._local import servers
from fixtures.gateway_stack import Stack, deploy, gateway_stack, load_module

pytestmark = pytest.mark.timeout(120)

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
API_KEY = "sk-duanflow-" + uuid.uuid4().hex


@pytest.fixture(scope="module")
def stack(
    nats_server: tuple[servers.Proc, servers.NatsCredentials], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    module = load_module(EXAMPLES / "chat_completions.py", "chat_completions")
    with gateway_stack(nats_server, tmp_path_factory.mktemp("openai")) as s:
        with pytest.MonkeyPatch.context() as mp:
            # as in `DUANFLOW_API_KEY=... duanflow deploy examples/chat_completions.py`
            mp.setenv("DUANFLOW_API_KEY", API_KEY)
            deploy(s, module, EXAMPLES)
        yield s


@pytest.fixture
def client(stack: Stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack.gateway_url}/v1", api_key=API_KEY, max_retries=0, timeout=30)


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


def test_wrong_key_is_401(stack: Stack) -> None:
    bad = openai.OpenAI(base_url=f"{stack.gateway_url}/v1", api_key="sk-wrong", max_retries=0, timeout=30)
    with pytest.raises(openai.AuthenticationError) as info:
        bad.chat.completions.create(model="duanflow-qwen", messages=[{"role": "user", "content": "hi"}])
    assert info.value.status_code == 401
    assert info.value.response.headers["www-authenticate"].startswith("Bearer")

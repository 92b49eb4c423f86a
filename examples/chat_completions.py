"""An OpenAI-compatible ``/v1/chat/completions`` endpoint with a tiny stand-in model.

    DUANFLOW_API_KEY=sk-local-123 duanflow deploy examples/chat_completions.py

Any OpenAI client can then talk to it through the gateway::

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8080/v1", api_key="sk-local-123")
    client.chat.completions.create(model="duanflow-qwen", messages=[{"role": "user", "content": "hi"}])

The stand-in "model" echoes the last user message word by word; swap in a real one at module scope so warm
replicas load its weights once.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any

import duanflow as df

# The bearer token is DUANFLOW_API_KEY from the app's env or, at deploy, from the deploying shell; the gateway only
# ever sees a salted digest of it.
app = df.App("chat-completions")

MODEL = "duanflow-qwen"


class TinyChatModel:
    """Stand-in for a real LLM: answers with the last user message, one word per token."""

    def generate(self, messages: list[dict[str, Any]], temperature: float = 0.7) -> Iterator[str]:
        last = next((m.get("content", "") for m in reversed(messages) if m.get("role") == "user"), "")
        words = f"You said: {last}".split(" ")
        for i, word in enumerate(words):
            yield word if i == 0 else " " + word


chat_model = TinyChatModel()


@app.endpoint(
    method="POST",
    path="/v1/chat/completions",
    gpu="H100",
    keep_warm=1,
    auth=df.Auth.bearer("DUANFLOW_API_KEY"),
    stream="sse",
)
def chat_completions(request: df.Request) -> Any:
    """OpenAI's chat completions: a ``chat.completion`` object, or SSE ``chat.completion.chunk`` events."""
    body = request.json()
    if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
        return df.Response(400, body={"error": {"code": "invalid_input", "message": "'messages' must be a list"}})
    completion_id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
    created = int(time.time())
    model = str(body.get("model") or MODEL)
    tokens = chat_model.generate(body["messages"], temperature=body.get("temperature", 0.7))
    if body.get("stream"):
        return _stream(tokens, completion_id, created, model)
    text = "".join(tokens)
    n = len(text.split())
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop", "logprobs": None}
        ],
        "usage": {"prompt_tokens": n, "completion_tokens": n, "total_tokens": 2 * n},
    }


def _stream(tokens: Iterator[str], completion_id: str, created: int, model: str) -> Iterator[Any]:
    def chunk(delta: dict[str, str], finish: str | None = None) -> dict[str, Any]:
        return {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}],
        }

    yield chunk({"role": "assistant", "content": ""})
    for token in tokens:
        yield chunk({"content": token})
    yield chunk({}, "stop")
    yield "[DONE]"

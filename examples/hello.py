"""The quickstart of the product page: one GPU function, deployed and called remotely.

duanflow dev up                      # a local stack (simulated GPUs where there are none)
duanflow deploy examples/hello.py
python examples/hello.py             # calls classify_ticket.remote(...) and prints the answer
duanflow run examples/hello.py::classify_ticket --text "我的模型接口超时了"
"""

from __future__ import annotations

import duanflow as df

app = df.App("hello-gpu")

# A stand-in for the model: keywords per label, in Chinese and English. Built at module scope, as real
# weights would be, so a warm replica loads it once.
KEYWORDS: dict[str, tuple[str, ...]] = {
    "timeout": ("超时", "timeout", "timed out", "慢", "slow", "latency", "延迟"),
    "billing": ("账单", "扣费", "发票", "退款", "billing", "invoice", "refund", "charge"),
    "auth": ("登录", "密码", "权限", "token", "login", "password", "401", "403"),
    "outage": ("宕机", "挂了", "502", "503", "down", "outage", "unavailable"),
    "gpu": ("显存", "gpu", "cuda", "oom", "out of memory"),
}


@app.function(gpu="H100", memory="48Gi+", timeout=300)
def classify_ticket(text: str) -> dict[str, object]:
    """Label a support ticket: the label with the most keyword hits, and how sure it is."""
    lowered = text.lower()
    hits = {label: sum(lowered.count(word) for word in words) for label, words in KEYWORDS.items()}
    label, best = max(hits.items(), key=lambda item: item[1])
    if best == 0:
        return {"label": "other", "confidence": 0.0, "input": text}
    return {"label": label, "confidence": round(best / sum(hits.values()), 2), "input": text}


if __name__ == "__main__":
    print(classify_ticket.remote("我的模型接口超时了"))

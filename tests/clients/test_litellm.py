"""LiteLLM's `text_completion` and `completion` (its text-completion-openai provider, which sends messages to
/v1/completions) against a live server, plain and streamed, offline: the local model cost map, our api_base."""

from __future__ import annotations

import os
from typing import Any

import httpx
import pytest
from support import LiveServer

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # read when litellm is imported: no cost-map fetch
litellm = pytest.importorskip("litellm")

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore:Items? .* the `ReadOnly` qualifier")]  # litellm's types

MODEL = "text-completion-openai/tiny-gpt"
PROMPT = "JULIET: O Romeo"


def kw(server: LiveServer, **more: Any) -> dict[str, Any]:
    return {"model": MODEL, "api_base": f"{server.url}/v1", "api_key": "unused", "temperature": 0,
            "max_tokens": 12, **more}


def ours(server: LiveServer, **body: Any) -> dict[str, Any]:
    r = httpx.post(f"{server.url}/v1/completions", json={"model": "tiny-gpt", "prompt": PROMPT, "max_tokens": 12,
                                                          "temperature": 0, **body}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


def test_text_completion_plain_and_streamed(server: LiveServer) -> None:
    ref = ours(server)
    out = litellm.text_completion(prompt=PROMPT, **kw(server))
    assert out.choices[0].text == ref["choices"][0]["text"]
    assert out.choices[0].finish_reason == ref["choices"][0]["finish_reason"]
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (len(PROMPT), 12)
    chunks = list(litellm.text_completion(prompt=PROMPT, stream=True, **kw(server)))
    assert "".join(c.choices[0].text or "" for c in chunks) == ref["choices"][0]["text"]
    assert chunks[-1].choices[0].finish_reason == ref["choices"][0]["finish_reason"]


def test_text_completion_scores_the_prompt(server: LiveServer) -> None:
    ref = ours(server, echo=True, logprobs=1, max_tokens=1)["choices"][0]["logprobs"]
    out = litellm.text_completion(prompt=PROMPT, **kw(server, echo=True, logprobs=1, max_tokens=1))
    lp = out.choices[0].logprobs
    assert lp.token_logprobs[0] is None and lp.token_logprobs[1:] == pytest.approx(ref["token_logprobs"][1:])
    assert lp.text_offset == ref["text_offset"] and lp.text_offset[-1] == len(PROMPT)


def test_completion_with_messages_plain_and_streamed(server: LiveServer) -> None:
    ref = ours(server)["choices"][0]
    messages = [{"role": "user", "content": PROMPT}]
    out = litellm.completion(messages=messages, **kw(server))
    assert out.choices[0].message.content == ref["text"] and out.choices[0].finish_reason == ref["finish_reason"]
    chunks = list(litellm.completion(messages=messages, stream=True, **kw(server)))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == ref["text"]
    assert chunks[-1].choices[0].finish_reason == ref["finish_reason"]

"""langchain-openai's ChatOpenAI against the live server: invoke, stream (with usage) and batch give the replies
the official openai SDK gets for the same messages."""

from __future__ import annotations

from typing import Any

import openai
import pytest
from support import LiveServer

langchain_openai = pytest.importorskip("langchain_openai")

pytestmark = pytest.mark.usefixtures("one_thread")

MESSAGES = [("system", "Be brief."), ("human", "ROMEO: O Juliet")]
AS_OPENAI: list[Any] = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "ROMEO: O Juliet"}]


def chat_model(server: LiveServer, **kw: Any) -> Any:
    return langchain_openai.ChatOpenAI(base_url=f"{server.url}/v1", api_key="x", model="tiny-gpt", temperature=0,
                                       max_tokens=12, max_retries=0, timeout=60, **kw)


def reference(server: LiveServer, messages: list[Any]) -> Any:
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0, timeout=60)
    return client.chat.completions.create(model="tiny-gpt", messages=messages, max_tokens=12, temperature=0)


def test_invoke_stream_and_batch(server: LiveServer) -> None:
    ref = reference(server, AS_OPENAI)
    want = ref.choices[0].message.content
    llm = chat_model(server, stream_usage=True)

    reply = llm.invoke(MESSAGES)
    assert reply.content == want
    assert reply.response_metadata["finish_reason"] == ref.choices[0].finish_reason
    assert reply.usage_metadata["input_tokens"] == ref.usage.prompt_tokens

    chunks = list(llm.stream(MESSAGES))
    assert "".join(str(c.content) for c in chunks) == want
    usage = [c.usage_metadata for c in chunks if c.usage_metadata]
    assert len(usage) == 1 and usage[0]["output_tokens"] == ref.usage.completion_tokens

    prompts = ["ROMEO:", "JULIET:"]
    replies = llm.batch(prompts)
    singles = [reference(server, [{"role": "user", "content": p}]).choices[0].message.content for p in prompts]
    assert [r.content for r in replies] == singles

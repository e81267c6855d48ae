"""/v1/completions through the official `openai` SDK and a bare SSE client, checked against /v1/generate."""

from __future__ import annotations

import json
from typing import Any

import httpx
import openai
import pytest
from support import LiveServer

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models on a shared CPU: one thread is faster
PROMPT = "JULIET: O Romeo"


@pytest.fixture(scope="module")
def server(server_both: LiveServer) -> LiveServer:
    """Both engine clients: the engine on the server's thread, and in its own core process."""
    return server_both


@pytest.fixture(scope="module")
def client(server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0, timeout=60)


def native(server: LiveServer, **body: Any) -> dict[str, Any]:
    r = httpx.post(f"{server.url}/v1/generate", json={"prompt": PROMPT, **body}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def test_greedy_completion_equals_the_native_endpoint(client: openai.OpenAI, server: LiveServer) -> None:
    c = client.completions.create(model="tiny-gpt", prompt=PROMPT, max_tokens=20, temperature=0)
    ref = native(server, max_tokens=20, temperature=0)
    assert c.object == "text_completion" and c.model == "tiny-gpt" and len(c.choices) == 1
    assert c.choices[0].text == ref["text"] and c.choices[0].finish_reason == ref["finish_reason"]
    assert c.usage is not None
    assert (c.usage.prompt_tokens, c.usage.completion_tokens) == (len(PROMPT), len(ref["token_ids"]))


def test_n_choices_with_a_seed_are_reproducible(client: openai.OpenAI, server: LiveServer) -> None:
    kw: dict[str, Any] = dict(model="tiny-gpt", prompt=PROMPT, max_tokens=24, temperature=1.0, top_p=0.9, n=2, seed=11)
    first, again = client.completions.create(**kw), client.completions.create(**kw)
    assert [c.index for c in first.choices] == [0, 1]
    assert [c.text for c in first.choices] == [c.text for c in again.choices]
    # choice j draws with seed + j, so each one is a native request with that seed
    assert [c.text for c in first.choices] == [native(server, max_tokens=24, temperature=1.0, top_p=0.9,
                                                      seed=11 + j)["text"] for j in range(2)]
    assert first.usage is not None and first.usage.prompt_tokens == len(PROMPT)  # one prompt, counted once


def test_stop_echo_and_logprobs(client: openai.OpenAI, server: LiveServer) -> None:
    text = native(server, max_tokens=30, temperature=0, ignore_eos=True)["text"]
    stop = text[len(text) // 2 :][:2]
    c = client.completions.create(model="tiny-gpt", prompt=PROMPT, max_tokens=30, temperature=0, stop=[stop],
                                  extra_body={"ignore_eos": True})
    assert c.choices[0].text == text[: text.index(stop)] and c.choices[0].finish_reason == "stop"
    echoed = client.completions.create(model="tiny-gpt", prompt=PROMPT, max_tokens=30, temperature=0, echo=True,
                                       extra_body={"ignore_eos": True})
    assert echoed.choices[0].text == PROMPT + text
    lp = client.completions.create(model="tiny-gpt", prompt=PROMPT, max_tokens=10, temperature=0, logprobs=2,
                                   extra_body={"ignore_eos": True}).choices[0].logprobs
    assert lp is not None and lp.tokens is not None and lp.token_logprobs is not None and lp.top_logprobs is not None
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 10
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs, strict=True):
        assert top is not None and len(top) == 2 and all(v <= 0 for v in top.values())
        assert chosen == pytest.approx(max(top.values()))  # greedy takes the most likely token


def test_prompt_scoring_through_the_sdk(client: openai.OpenAI, server: LiveServer) -> None:
    ids = httpx.post(f"{server.url}/v1/tokenize", json={"model": "tiny-gpt", "text": PROMPT}).json()["tokens"]
    c = client.completions.create(model="tiny-gpt", prompt=ids, echo=True, logprobs=1, max_tokens=0,
                                  extra_body={"prompt_logprobs": 1})
    choice = c.choices[0]
    lp = choice.logprobs
    assert choice.text == PROMPT and choice.finish_reason == "length" and lp is not None
    assert lp.tokens is not None and lp.token_logprobs is not None and lp.text_offset is not None
    assert len(lp.tokens) == len(ids) and lp.token_logprobs[0] is None and lp.text_offset == list(range(len(ids)))
    rows = choice.model_extra["prompt_logprobs"] if choice.model_extra else None
    assert rows is not None and rows[0] is None
    assert [row[str(t)]["logprob"] for row, t in zip(rows[1:], ids[1:], strict=True)] == lp.token_logprobs[1:]


def test_streaming_with_n_stop_seed_and_usage(client: openai.OpenAI) -> None:
    kw: dict[str, Any] = dict(model="tiny-gpt", prompt=PROMPT, max_tokens=24, temperature=1.0, top_p=0.9, n=2,
                              seed=5, stop=["\n\n"])
    whole = client.completions.create(**kw)
    chunks = list(client.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    texts, finish = ["", ""], [None, None]
    for ch in chunks[:-1]:
        assert ch.usage is None and len(ch.choices) == 1
        texts[ch.choices[0].index] += ch.choices[0].text
        if ch.choices[0].finish_reason is not None:
            finish[ch.choices[0].index] = ch.choices[0].finish_reason
    assert texts == [c.text for c in whole.choices]
    assert finish == [c.finish_reason for c in whole.choices]
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None and whole.usage is not None
    assert last.usage.completion_tokens == whole.usage.completion_tokens


def test_a_bare_sse_client_reads_chunks_until_done(server: LiveServer, client: openai.OpenAI) -> None:
    body = {"model": "tiny-gpt", "prompt": PROMPT, "max_tokens": 16, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        data = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]" and data.count("[DONE]") == 1
    chunks = [json.loads(d) for d in data[:-1]]
    assert all(c["object"] == "text_completion" and c["model"] == "tiny-gpt" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    text = "".join(c["choices"][0]["text"] for c in chunks)
    whole = client.completions.create(model="tiny-gpt", prompt=PROMPT, max_tokens=16, temperature=0)
    assert text == whole.choices[0].text and chunks[-1]["choices"][0]["finish_reason"] is not None


def test_prompt_lists_and_token_ids(client: openai.OpenAI, server: LiveServer) -> None:
    prompts = ["ROMEO:", "Two dogs"]
    batch = client.completions.create(model="tiny-gpt", prompt=prompts, max_tokens=8, temperature=0)
    singles = [client.completions.create(model="tiny-gpt", prompt=p, max_tokens=8, temperature=0).choices[0].text
               for p in prompts]
    assert [c.text for c in batch.choices] == singles
    ids = httpx.post(f"{server.url}/v1/tokenize", json={"model": "tiny-gpt", "text": "ROMEO:"}).json()["tokens"]
    by_ids = client.completions.create(model="tiny-gpt", prompt=ids, max_tokens=8, temperature=0)
    assert by_ids.choices[0].text == singles[0]


def test_errors_arrive_as_the_sdk_exceptions(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError, match="no-such-model"):
        client.completions.create(model="no-such-model", prompt="a", max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model="tiny-gpt", prompt="a", max_tokens=0)
    with pytest.raises(openai.BadRequestError, match="n is 1000"):
        client.completions.create(model="tiny-gpt", prompt="a", max_tokens=2, n=1000)
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        client.completions.create(model="tiny-gpt", prompt="a" * 500, max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="prompt"):
        client.completions.create(model="tiny-gpt", prompt=[10**6], max_tokens=2)

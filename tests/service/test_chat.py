"""/v1/chat/completions through the official `openai` SDK and a bare SSE client, checked against /v1/completions
on the prompt the plain default template renders (the same tokens, so greedy and seeded replies must match)."""

from __future__ import annotations

import json
from typing import Any

import httpx
import openai
import pytest
from support import LiveServer

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models on a shared CPU: one thread is faster

USER = "ROMEO: O Juliet"
MESSAGES: list[Any] = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": USER}]
RENDERED = f"system: Be brief.\nuser: {USER}\nassistant:"  # the documented default template


@pytest.fixture(scope="module")
def client(server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0, timeout=60)


def completion(client: openai.OpenAI, prompt: str, **kw: Any) -> Any:
    return client.completions.create(model="tiny-gpt", prompt=prompt, **kw)


def test_greedy_chat_is_the_completion_of_the_rendered_prompt(client: openai.OpenAI) -> None:
    c = client.chat.completions.create(model="tiny-gpt", messages=MESSAGES, max_tokens=20, temperature=0)
    ref = completion(client, RENDERED, max_tokens=20, temperature=0)
    assert c.object == "chat.completion" and c.model == "tiny-gpt" and len(c.choices) == 1
    msg = c.choices[0].message
    assert msg.role == "assistant" and msg.content == ref.choices[0].text
    assert c.choices[0].finish_reason == ref.choices[0].finish_reason
    assert c.usage is not None and ref.usage is not None
    assert (c.usage.prompt_tokens, c.usage.completion_tokens) == (len(RENDERED), ref.usage.completion_tokens)
    # content parts of type text are the same message
    parts = [MESSAGES[0], {"role": "user", "content": [{"type": "text", "text": USER}]}]
    again = client.chat.completions.create(model="tiny-gpt", messages=parts, max_tokens=20, temperature=0)
    assert again.choices[0].message.content == msg.content


def test_n_seed_stop_and_max_completion_tokens(client: openai.OpenAI) -> None:
    kw: dict[str, Any] = dict(temperature=1.0, top_p=0.9, n=2, seed=7)
    chat = client.chat.completions.create(model="tiny-gpt", messages=MESSAGES, max_completion_tokens=24, **kw)
    ref = completion(client, RENDERED, max_tokens=24, **kw)  # choice j draws with seed + j in both
    assert [c.index for c in chat.choices] == [0, 1]
    assert [c.message.content for c in chat.choices] == [c.text for c in ref.choices]
    assert chat.usage is not None and chat.usage.prompt_tokens == len(RENDERED)  # one prompt, counted once
    text = completion(client, RENDERED, max_tokens=30, temperature=0, extra_body={"ignore_eos": True}).choices[0].text
    stop = text[len(text) // 2 :][:2]
    c = client.chat.completions.create(model="tiny-gpt", messages=MESSAGES, max_tokens=30, temperature=0,
                                       stop=[stop], extra_body={"ignore_eos": True})
    assert c.choices[0].message.content == text[: text.index(stop)] and c.choices[0].finish_reason == "stop"
    five = client.chat.completions.create(model="tiny-gpt", messages=MESSAGES, max_completion_tokens=5,
                                          temperature=0, extra_body={"ignore_eos": True})
    assert five.usage is not None and five.usage.completion_tokens == 5
    assert five.choices[0].finish_reason == "length"


def test_continue_final_message(client: openai.OpenAI) -> None:
    messages: list[Any] = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "ROMEO: O"}]
    c = client.chat.completions.create(model="tiny-gpt", messages=messages, max_tokens=10, temperature=0,
                                       extra_body={"continue_final_message": True, "add_generation_prompt": False})
    ref = completion(client, "user: Hi\nassistant: ROMEO: O", max_tokens=10, temperature=0)
    assert c.choices[0].message.content == ref.choices[0].text
    with pytest.raises(openai.BadRequestError, match="continue_final_message"):
        client.chat.completions.create(model="tiny-gpt", messages=messages, max_tokens=2,
                                       extra_body={"continue_final_message": True, "add_generation_prompt": True})


def test_logprobs_in_chat_shape(client: openai.OpenAI) -> None:
    c = client.chat.completions.create(model="tiny-gpt", messages=MESSAGES, max_tokens=8, temperature=0,
                                       logprobs=True, top_logprobs=2, extra_body={"ignore_eos": True})
    lp = c.choices[0].logprobs
    assert lp is not None and lp.content is not None and len(lp.content) == 8
    assert "".join(t.token for t in lp.content) == c.choices[0].message.content
    for t in lp.content:
        assert t.bytes == list(t.token.encode()) and len(t.top_logprobs) == 2
        assert t.logprob == pytest.approx(max(x.logprob for x in t.top_logprobs))  # greedy takes the top one
    plain = client.chat.completions.create(model="tiny-gpt", messages=MESSAGES, max_tokens=4, temperature=0)
    assert plain.choices[0].logprobs is None


def test_streaming_deltas_finish_and_usage(client: openai.OpenAI) -> None:
    kw: dict[str, Any] = dict(model="tiny-gpt", messages=MESSAGES, max_tokens=24, temperature=1.0, n=2, seed=3,
                              logprobs=True)
    whole = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    texts, finish, roles = ["", ""], [None, None], [[], []]
    for ch in chunks[:-1]:
        assert ch.object == "chat.completion.chunk" and ch.usage is None and len(ch.choices) == 1
        choice = ch.choices[0]
        assert finish[choice.index] is None  # nothing after a choice's finish_reason
        roles[choice.index].append(choice.delta.role)
        texts[choice.index] += choice.delta.content or ""
        finish[choice.index] = choice.finish_reason
    assert [r[0] for r in roles] == ["assistant", "assistant"] and all(set(r[1:]) == {None} for r in roles)
    assert texts == [c.message.content for c in whole.choices]
    assert finish == [c.finish_reason for c in whole.choices]
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None and whole.usage is not None
    assert last.usage.model_dump() == whole.usage.model_dump()


def test_a_bare_sse_client_reads_chunks_until_done(server: LiveServer) -> None:
    body = {"model": "tiny-gpt", "messages": MESSAGES, "max_tokens": 6, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        data = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]" and data.count("[DONE]") == 1
    chunks = [json.loads(d) for d in data[:-1]]
    assert len({c["id"] for c in chunks}) == 1 and all("usage" not in c for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-1]["choices"][0]["delta"] == {} and chunks[-1]["choices"][0]["finish_reason"] == "length"
    # vLLM's continuous_usage_stats: the usage so far on every chunk, then the usage chunk
    body["stream_options"] = {"include_usage": True, "continuous_usage_stats": True}
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=60) as r:
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    counts = [c["usage"]["completion_tokens"] for c in chunks]
    assert counts == sorted(counts) and counts[0] == 0 and counts[-1] == 6 and chunks[-1]["choices"] == []


def test_nulls_and_harmless_values_pass_and_an_omitted_max_tokens_fills_the_context(server: LiveServer) -> None:
    nulls = {k: None for k in ("temperature", "top_p", "n", "max_tokens", "max_completion_tokens", "stop", "seed",
                               "logprobs", "top_logprobs", "stream", "stream_options", "tools", "tool_choice",
                               "response_format", "presence_penalty", "frequency_penalty", "user", "logit_bias")}
    harmless = {"skip_special_tokens": True, "use_beam_search": False, "best_of": 1, "tools": [], "top_k": -1,
                "tool_choice": "none", "response_format": {"type": "text"}, "modalities": ["text"]}
    body = {"model": "tiny-gpt", "messages": MESSAGES, **nulls, "ignore_eos": True}
    r = httpx.post(f"{server.url}/v1/chat/completions", json={**body, **harmless, "max_tokens": 2}, timeout=60)
    assert r.status_code == 200, r.text
    r = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    usage = r.json()["usage"]
    context = httpx.get(f"{server.url}/v1/models/tiny-gpt").json()["details"]["context_length"]
    assert usage["total_tokens"] == context and r.json()["choices"][0]["finish_reason"] == "length"


def test_vllm_sampling_extras(client: openai.OpenAI, server: LiveServer) -> None:
    greedy = client.chat.completions.create(model="tiny-gpt", messages=MESSAGES, max_tokens=8, temperature=0,
                                            logprobs=True)
    assert greedy.choices[0].logprobs is not None and greedy.choices[0].logprobs.content
    first = greedy.choices[0].logprobs.content[0].token
    ids = httpx.post(f"{server.url}/v1/tokenize", json={"model": "tiny-gpt", "text": first}).json()["tokens"]
    extra: dict[str, Any] = {"top_k": 5, "min_p": 0.01, "repetition_penalty": 1.1, "stop_token_ids": ids}
    stopped = client.chat.completions.create(model="tiny-gpt", messages=MESSAGES, max_tokens=8, temperature=0,
                                             extra_body=extra)
    assert stopped.usage is not None and stopped.choices[0].finish_reason == "stop"
    assert stopped.usage.completion_tokens <= 1  # the stop token comes first
    held = client.chat.completions.create(model="tiny-gpt", messages=MESSAGES, max_tokens=8, temperature=0,
                                          extra_body={**extra, "min_tokens": 4})
    assert held.usage is not None and held.usage.completion_tokens >= 4


def test_a_translator_translates_the_last_user_message(client: openai.OpenAI) -> None:
    messages: list[Any] = [{"role": "user", "content": "Ein Mann."}, {"role": "assistant", "content": "A man."},
                           {"role": "user", "content": "Two dogs play in the snow."}]
    c = client.chat.completions.create(model="tiny-mt", messages=messages, temperature=0)
    ref = client.completions.create(model="tiny-mt", prompt="Two dogs play in the snow.", temperature=0)
    assert c.choices[0].message.content == ref.choices[0].text
    assert c.usage is not None and ref.usage is not None and c.usage.prompt_tokens == ref.usage.prompt_tokens


def test_models_say_chat_is_available(server: LiveServer) -> None:
    cards = {m["id"]: m["details"]["chat"] for m in httpx.get(f"{server.url}/v1/models").json()["data"]}
    assert cards["tiny-gpt"] == {"available": True, "prompt": "default chat template"}
    assert cards["tiny-mt"]["available"] is True


@pytest.mark.parametrize(("extra", "param"), [
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tool_choice"),  # "auto": no parser
    ({"tools": [{"type": "function", "function": {"name": "f g"}}], "tool_choice": "required"},
     "tools.0.function.name"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objec"}}}},
     "response_format.json_schema.schema"),
    ({"response_format": {"type": "grammar"}}, "response_format.type"),
    ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs"),
    ({"modalities": ["text", "audio"]}, "modalities"),
    ({"logit_bias": {"5": 1.0}}, "logit_bias"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages.0.content.0"),
    ({"messages": [{"role": "function", "content": "4", "name": "a"}]}, "messages.0.role"),
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"n": 1000}, "n"),
    ({"max_completion_tokens": 10**6}, "max_completion_tokens"),
    ({"use_beam_search": True}, "use_beam_search"),
    ({"guided_json": {"type": "objec"}}, "guided_json"),
    ({"guided_regex": "[a-", "guided_choice": ["a"]}, "guided_choice"),
    ({"chat_template": "{{ messages }}"}, "chat_template"),
    ({"frobnicate": 1}, "frobnicate"),
    ({"messages": []}, "messages"),
])
def test_what_we_cannot_honour_is_refused_by_name(server: LiveServer, extra: dict[str, Any], param: str) -> None:
    body = {"model": "tiny-gpt", "messages": MESSAGES, "max_tokens": 2, **extra}
    r = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and param.split(".")[0] in error["message"]
    assert error["type"] == "invalid_request_error"


def test_errors_arrive_as_the_sdk_exceptions(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError, match="no-such-model"):
        client.chat.completions.create(model="no-such-model", messages=MESSAGES)
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        client.chat.completions.create(model="tiny-gpt", messages=[{"role": "user", "content": "a" * 500}])

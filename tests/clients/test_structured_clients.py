"""Structured output and tool calls through the clients people use, unchanged, against a live server on a random
GPT-2 (byte-level BPE): the openai SDK's `chat.completions.parse(response_format=PydanticModel)`, its streamed
tool calls, and langchain's `with_structured_output` (json_schema and function calling)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any, Literal

import jsonschema
import openai
import pytest
from langchain_openai import ChatOpenAI
from pydantic import BaseModel, Field

from tests.support import LiveServer, make_checkpoints, random_gpt2, settings_for

GPT2 = "gpt2-random"
MESSAGES: list[Any] = [{"role": "user", "content": "What is the weather in Verona?"}]
WEATHER = {"type": "object", "properties": {
    "city": {"type": "string", "maxLength": 10},
    "unit": {"enum": ["celsius", "fahrenheit"]},
    "days": {"type": "integer", "minimum": 1, "maximum": 7}}, "required": ["city", "unit", "days"]}
TOOLS: list[Any] = [
    {"type": "function", "function": {"name": "get_weather", "description": "The forecast", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "get_time", "parameters": {
        "type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"]}}},
]


HERMES = "gpt2-hermes"  # the same random GPT-2 with a chat template that declares tools, Hermes' way
HERMES_TEMPLATE = """{%- if tools %}<|im_start|>system
You may call these functions: {% for t in tools %}{{ t.function.name }} {% endfor %}
Call one as <tool_call>{"name": <name>, "arguments": <arguments>}</tool_call><|im_end|>
{% endif %}{% for m in messages %}<|im_start|>{{ m.role }}
{{ m.content }}<|im_end|>
{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""
HERMES_CALL = r'Sure\. <tool_call>\{"name": "get_weather", "arguments": \{"city": "[a-z]{2,6}", "unit": "celsius", "days": 2\}\}</tool_call>'


class Person(BaseModel):
    name: str = Field(max_length=8)
    age: int = Field(ge=0, le=99)
    role: Literal["admin", "user"]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    root = make_checkpoints(tmp_path_factory.mktemp("clients-structured"))
    random_gpt2(root / GPT2)
    (random_gpt2(root / HERMES) / "chat_template.jinja").write_text(HERMES_TEMPLATE)
    s = LiveServer(settings_for(root, kv_cache_blocks=1024))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused")


def test_openai_parse_returns_the_pydantic_object(client: openai.OpenAI) -> None:
    for seed in range(5):
        done = client.chat.completions.parse(model=GPT2, messages=MESSAGES, response_format=Person, seed=seed,
                                             temperature=1.0, max_tokens=200)
        assert isinstance(done.choices[0].message.parsed, Person)


def _arguments_validate(calls: Any, schema: dict[str, Any]) -> None:
    assert calls
    for call in calls:
        jsonschema.validate(json.loads(call.function.arguments), schema)


def test_tool_choice_required_and_named_give_tool_calls_that_validate(client: openai.OpenAI) -> None:
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    for seed in range(4):
        r = client.chat.completions.create(model=GPT2, messages=MESSAGES, tools=TOOLS, tool_choice="required",
                                           parallel_tool_calls=False, seed=seed, temperature=1.0, max_tokens=200)
        calls = r.choices[0].message.tool_calls
        assert r.choices[0].finish_reason == "tool_calls" and calls is not None and len(calls) == 1
        _arguments_validate(calls, schemas[calls[0].function.name])  # type: ignore[union-attr]
        named = client.chat.completions.create(
            model=GPT2, messages=MESSAGES, tools=TOOLS, seed=seed, temperature=1.0, max_tokens=200,
            tool_choice={"type": "function", "function": {"name": "get_weather"}})
        calls = named.choices[0].message.tool_calls
        assert calls is not None and calls[0].function.name == "get_weather"  # type: ignore[union-attr]
        _arguments_validate(calls, WEATHER)


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_streamed_tool_calls_equal_the_whole_reply(client: openai.OpenAI, choice: Any) -> None:
    args: dict[str, Any] = dict(model=GPT2, messages=MESSAGES, tools=TOOLS, tool_choice=choice, seed=11,
                                temperature=1.0, max_tokens=300)
    whole = client.chat.completions.create(**args).choices[0]
    calls: dict[int, dict[str, str]] = {}
    finish = None
    for chunk in client.chat.completions.create(**args, stream=True):
        for c in chunk.choices:
            finish = c.finish_reason or finish
            for d in c.delta.tool_calls or []:
                entry = calls.setdefault(d.index, {"name": "", "arguments": ""})
                entry["name"] += (d.function and d.function.name) or ""
                entry["arguments"] += (d.function and d.function.arguments) or ""
    assert whole.message.tool_calls is not None and finish == whole.finish_reason
    assert [{"name": c.function.name, "arguments": c.function.arguments}  # type: ignore[union-attr]
            for c in whole.message.tool_calls] == [calls[i] for i in sorted(calls)]


@pytest.mark.parametrize("method", ["json_schema", "function_calling"])
def test_langchain_with_structured_output(server: LiveServer, method: str) -> None:
    llm = ChatOpenAI(base_url=f"{server.url}/v1", api_key="unused", model=GPT2, temperature=1.0, max_tokens=200,
                     seed=5)  # type: ignore[call-arg]
    result = llm.with_structured_output(Person, method=method).invoke("Describe a person.")  # type: ignore[arg-type]
    assert isinstance(result, Person)


def test_tool_choice_auto_reads_hermes_calls_from_a_template_that_declares_tools(client: openai.OpenAI) -> None:
    """The model decides; here a regex decides for the random model, so that the parser has a call to read."""
    args: dict[str, Any] = dict(model=HERMES, messages=MESSAGES, tools=TOOLS, seed=2, temperature=1.0,
                                max_tokens=120, extra_body={"guided_regex": HERMES_CALL})
    whole = client.chat.completions.create(**args).choices[0]
    assert whole.finish_reason == "tool_calls" and whole.message.content == "Sure."
    calls = whole.message.tool_calls
    assert calls is not None and calls[0].function.name == "get_weather"  # type: ignore[union-attr]
    _arguments_validate(calls, WEATHER)
    content, streamed, finish = "", [], None
    for chunk in client.chat.completions.create(**args, stream=True):
        for c in chunk.choices:
            content += c.delta.content or ""
            streamed += [d.function.arguments for d in c.delta.tool_calls or [] if d.function]
            finish = c.finish_reason or finish
    assert content.strip() == "Sure." and finish == "tool_calls"
    assert streamed == [calls[0].function.arguments]  # type: ignore[union-attr]
    free = client.chat.completions.create(model=HERMES, messages=MESSAGES, tools=TOOLS, seed=2, max_tokens=20)
    assert free.choices[0].message.tool_calls is None and free.choices[0].message.content  # it chose to write

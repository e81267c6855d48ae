"""Structured output against a live server: JSON schemas, regexes, choices and grammars hold random-weight models
(where only the constraint can make the output valid) at temperature 1, on a byte-level BPE GPT-2 and on a
character-level model; what a character vocabulary cannot spell is a 400 naming the character; constrained rows
leave their unconstrained neighbours' tokens alone; streamed equals non-streamed; tool calls validate."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest

from tests.support import LiveServer, make_checkpoints, random_gpt2, settings_for, sse_events

GPT2 = "gpt2-random"
SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "pattern": "^[A-Z][a-z]{1,6}$"},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 5}, "maxItems": 3},
        "address": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8},
                                                     "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                    "required": ["city", "zip"]},
    },
    "required": ["name", "age", "role", "tags", "address"],
}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """tiny-gpt (one token per character, random weights), tiny-mt and a random GPT-2 folder with a byte-level
    BPE tokenizer.json (transformers' own save)."""
    root = make_checkpoints(tmp_path_factory.mktemp("structured"))
    random_gpt2(root / GPT2)
    s = LiveServer(settings_for(root, kv_cache_blocks=1024, max_num_seqs=32))
    yield s
    s.stop()


def post(server: LiveServer, path: str, body: dict[str, Any], status: int = 200) -> dict[str, Any]:
    r = httpx.post(f"{server.url}{path}", json=body, timeout=120)
    assert r.status_code == status, r.text
    return r.json()  # type: ignore[no-any-return]


async def _many(url: str, path: str, bodies: list[dict[str, Any]]) -> list[dict[str, Any]]:
    async with httpx.AsyncClient(timeout=300) as client:
        rs = await asyncio.gather(*(client.post(f"{url}{path}", json=b) for b in bodies))
    assert all(r.status_code == 200 for r in rs), [r.text for r in rs if r.status_code != 200][:1]
    return [r.json() for r in rs]


def test_json_schema_outputs_validate_at_temperature_one_over_20_seeds(server: LiveServer) -> None:
    chat = [{"model": GPT2, "messages": [{"role": "user", "content": "A person, please."}], "temperature": 1.0,
             "seed": seed, "max_tokens": 300,
             "response_format": {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}}}
            for seed in range(10)]
    completions = [{"model": GPT2, "prompt": "ROMEO:", "temperature": 1.0, "seed": seed, "max_tokens": 300,
                    "guided_json": SCHEMA} for seed in range(10, 20)]
    texts = [r["choices"][0]["message"]["content"] for r in asyncio.run(_many(server.url, "/v1/chat/completions", chat))]
    texts += [r["choices"][0]["text"] for r in asyncio.run(_many(server.url, "/v1/completions", completions))]
    for text in texts:
        jsonschema.validate(json.loads(text), SCHEMA)
    assert len(set(texts)) > 10  # sampled, not one greedy answer
    free = post(server, "/v1/completions", {**completions[0], "guided_json": None})["choices"][0]["text"]
    with pytest.raises(ValueError):  # without the constraint this model writes no JSON
        json.loads(free)


@pytest.mark.parametrize("model", ["tiny-gpt", GPT2])
def test_regex_choice_and_grammar_hold_char_and_bpe_models(server: LiveServer, model: str) -> None:
    regex = r"[A-Z][a-z]{2,8}( [a-z]{2,8}){1,3}\."
    choices = ["Romeo", "Juliet", "the sun"]
    grammar = 'root ::= "ROMEO: " word (" " word)* "."\nword ::= [a-z]+'
    base = {"model": model, "prompt": "JULIET: ", "temperature": 1.0, "max_tokens": 60}
    for seed in range(6):
        out = post(server, "/v1/completions", {**base, "seed": seed, "guided_regex": regex})["choices"][0]
        assert re.fullmatch(regex, out["text"]) and out["finish_reason"] == "stop", out
        out = post(server, "/v1/completions", {**base, "seed": seed, "structured_outputs": {"choice": choices}})
        assert out["choices"][0]["text"] in choices
        text = post(server, "/v1/generate", {**base, "seed": seed, "guided_grammar": grammar})["text"]
        assert re.fullmatch(r"ROMEO: [a-z]+( [a-z]+)*\.", text) or len(text) > 40, text


def test_what_a_character_vocabulary_cannot_spell_is_a_400_naming_the_character(server: LiveServer) -> None:
    base = {"model": "tiny-gpt", "prompt": "ROMEO:", "max_tokens": 20}
    err = post(server, "/v1/completions", {**base, "guided_regex": "[a-z]+@[a-z]+"}, 400)["error"]
    assert err["param"] == "guided_regex" and "'@'" in err["message"]
    err = post(server, "/v1/generate", {**base, "guided_grammar": 'root ::= "ROMEO" [a-z]* "!"'}, 400)["error"]
    assert err["param"] == "guided_grammar" and "needs '!', which" in err["message"]
    err = post(server, "/v1/chat/completions", {"model": "tiny-gpt", "messages": [{"role": "user", "content": "x"}],
                                                "response_format": {"type": "json_object"}}, 400)["error"]
    assert err["param"] == "response_format" and "'{'" in err["message"]
    err = post(server, "/v1/completions", {**base, "guided_choice": ["{x}", "y9"]}, 400)["error"]
    assert "needs '9', which" in err["message"]  # one character short of "y9" (and two of "{x}")
    post(server, "/v1/completions", {**base, "guided_choice": ["{x}", "yes"]})  # one spellable choice is enough


@pytest.mark.parametrize(("field", "value", "param", "words"), [
    ("guided_json", {"type": "objec"}, "guided_json", "objec"),
    ("structured_outputs", {"json": {"type": "object", "properties": {"a": {"type": "strin"}}}},
     "structured_outputs.json", "strin"),
    ("guided_regex", "(a|b", "guided_regex", "parenthesis"),
    ("guided_grammar", "root ::= foo", "guided_grammar", "foo"),
    ("structured_outputs", {"regex": "a", "frobnicate": 1}, "structured_outputs.frobnicate", "frobnicate"),
    ("guided_choice", [], "guided_choice", "non-empty"),
])
def test_a_bad_constraint_is_a_400_naming_it(server: LiveServer, field: str, value: Any, param: str,
                                             words: str) -> None:
    err = post(server, "/v1/completions", {"model": GPT2, "prompt": "x", field: value}, 400)["error"]
    assert err["param"] == param and words in err["message"], err


def test_unconstrained_rows_get_their_tokens_alone_or_beside_constrained_ones(server: LiveServer) -> None:
    free = [{"model": GPT2, "prompt": p, "temperature": 1.0, "seed": 7, "max_tokens": 24, "ignore_eos": True}
            for p in ("ROMEO:", "Two dogs")]
    alone = [post(server, "/v1/completions", b)["choices"][0]["text"] for b in free]
    held = [{"model": GPT2, "prompt": "x", "temperature": 1.0, "seed": s, "max_tokens": 200, "guided_json": SCHEMA}
            for s in range(4)]
    together = asyncio.run(_many(server.url, "/v1/completions", [*free, *held]))
    assert [r["choices"][0]["text"] for r in together[:2]] == alone
    for r in together[2:]:
        jsonschema.validate(json.loads(r["choices"][0]["text"]), SCHEMA)


def test_streamed_equals_not_streamed_with_n_and_logprobs(server: LiveServer) -> None:
    body = {"model": GPT2, "messages": [{"role": "user", "content": "Who?"}], "temperature": 1.0, "seed": 3, "n": 2,
            "max_tokens": 300, "logprobs": True, "response_format": {"type": "json_schema", "json_schema": {
                "name": "person", "schema": SCHEMA}}}
    whole = post(server, "/v1/chat/completions", body)["choices"]
    parts: dict[int, list[str]] = {0: [], 1: []}
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json={**body, "stream": True}, timeout=120) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                for c in json.loads(line[6:])["choices"]:
                    parts[c["index"]].append(c["delta"].get("content") or "")
    assert ["".join(parts[i]) for i in (0, 1)] == [c["message"]["content"] for c in whole]
    for c in whole:
        jsonschema.validate(json.loads(c["message"]["content"]), SCHEMA)
        assert c["logprobs"]["content"] and all(t["logprob"] <= 0 for t in c["logprobs"]["content"])


def test_streamed_attention_rows_for_a_constrained_request(server: LiveServer) -> None:
    body = {"model": "tiny-gpt", "prompt": "ROMEO: ", "temperature": 1.0, "seed": 1, "max_tokens": 30,
            "stream": True, "guided_regex": r"[a-z]{3,6} [a-z]{3,6}\.", "return_attention": {"layers": [0]}}
    with httpx.stream("POST", f"{server.url}/v1/generate", json=body, timeout=120) as r:
        events = list(sse_events(r.iter_lines()))
    tokens = [d for kind, d in events if kind == "token" and "token_id" in d]
    assert re.fullmatch(r"[a-z]{3,6} [a-z]{3,6}\.", "".join(t["text"] for t in tokens))
    assert all("attention" in t for t in tokens) and events[-1][0] == "done"


def test_beam_search_with_a_constraint_is_refused(server: LiveServer) -> None:
    err = post(server, "/v1/completions", {"model": GPT2, "prompt": "x", "use_beam_search": True, "n": 2,
                                           "guided_regex": "a+"}, 400)["error"]
    assert err["param"] == "guided_regex" and "beam" in err["message"]


def test_chunked_and_preempted_constrained_requests_give_the_tokens_of_a_roomy_server(server: LiveServer,
                                                                                      tmp_path: Path) -> None:
    """A KV pool too small for every request at once (some are preempted and recomputed, their matchers kept) and
    a token budget that prefills the prompt in chunks: greedy constrained outputs equal the roomy server's."""
    root = make_checkpoints(tmp_path)
    random_gpt2(root / GPT2)
    s = LiveServer(settings_for(root, kv_cache_blocks=96, max_model_len=256, max_num_seqs=8,
                                max_num_batched_tokens=8))
    try:
        bodies = [{"model": GPT2, "prompt": f"ROMEO {i}: " * 4, "temperature": 0.0, "max_tokens": 200,
                   "guided_json": SCHEMA} for i in range(8)]
        tight = [r["choices"][0]["text"] for r in asyncio.run(_many(s.url, "/v1/completions", bodies))]
        engine = s.models[GPT2].engine
        assert engine.scheduler.num_preemptions > 0 and engine.blocks.num_free == engine.blocks.num_blocks
    finally:
        s.stop()
    roomy = [r["choices"][0]["text"] for r in asyncio.run(_many(server.url, "/v1/completions", bodies))]
    assert tight == roomy
    for text in tight:
        jsonschema.validate(json.loads(text), SCHEMA)

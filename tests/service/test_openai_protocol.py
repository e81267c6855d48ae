"""/v1/completions as OpenAI and vLLM define it, against a live server: prompt scoring (echo + logprobs, max_tokens
0, prompt_logprobs) equal to a plain forward pass of the same weights, text offsets, nullable fields, vLLM's sampling
extras, usage on stream chunks, the omitted max_tokens, and vLLM's /tokenize, /detokenize, /tokenizer_info,
/version."""

from __future__ import annotations

import itertools
from typing import Any

import httpx
import pytest
import torch
from support import LiveServer, sse_events

from model.checkpoint import load_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def server(server_both: LiveServer) -> LiveServer:
    """Both engine clients: the engine on the server's thread, and in its own core process."""
    return server_both

PROMPT = "JULIET: O Romeo, Romeo, wherefore art thou Romeo? Deny t"  # 56 characters


def post(server: LiveServer, body: dict[str, Any], status: int = 200) -> dict[str, Any]:
    r = httpx.post(f"{server.url}/v1/completions", json={"model": "tiny-gpt", **body}, timeout=60)
    assert r.status_code == status, r.text
    return r.json()  # type: ignore[no-any-return]


def reference(server: LiveServer, ids: list[int], k: int) -> tuple[list[float], list[list[int]]]:
    """Each prompt token's log-prob given the ones before it, and the top-k ids there, from one forward pass of a
    fresh copy of the checkpoint."""
    model = load_checkpoint(server.models["tiny-gpt"].checkpoint.path).model.eval()
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids]))[0].float(), dim=-1)  # (T, vocab)
    target = torch.tensor(ids[1:])
    chosen = logp[:-1].gather(1, target[:, None])[:, 0]
    return chosen.tolist(), logp[:-1].topk(k, dim=-1).indices.tolist()


def test_echo_with_max_tokens_0_scores_the_prompt_like_a_forward_pass(server: LiveServer) -> None:
    tok = server.models["tiny-gpt"].tokenizer
    ids = tok.encode(PROMPT)
    out = post(server, {"prompt": PROMPT, "max_tokens": 0, "echo": True, "logprobs": 2})
    choice = out["choices"][0]
    assert choice["text"] == PROMPT and choice["finish_reason"] == "length"
    assert out["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 0, "total_tokens": len(ids)}
    lp = choice["logprobs"]
    assert lp["tokens"] == [tok.token_text(i) for i in ids]
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    want, top_ids = reference(server, ids, 2)
    assert lp["token_logprobs"][1:] == pytest.approx(want, abs=1e-4)
    for i, (top, best) in enumerate(zip(lp["top_logprobs"][1:], top_ids, strict=True)):
        assert set(top) == {tok.token_text(t) for t in [*best, ids[i + 1]]}  # the top 2 and the token there
        assert max(top.values()) >= lp["token_logprobs"][i + 1]
    assert lp["text_offset"] == list(range(len(PROMPT)))  # one character per token


def test_token_id_prompts_score_as_lm_eval_reads_them(server: LiveServer) -> None:
    """lm-evaluation-harness sends token ids with echo, logprobs 1, max_tokens 1 and reads token_logprobs[ctxlen:-1]."""
    ids = server.models["tiny-gpt"].tokenizer.encode(PROMPT)
    scored = post(server, {"prompt": ids, "max_tokens": 0, "echo": True, "logprobs": 1})["choices"][0]["logprobs"]
    out = post(server, {"prompt": ids, "max_tokens": 1, "echo": True, "logprobs": 1, "temperature": 0})
    lp = out["choices"][0]["logprobs"]
    assert len(lp["token_logprobs"]) == len(ids) + 1
    assert lp["token_logprobs"][:-1] == pytest.approx(scored["token_logprobs"], abs=1e-5)
    assert sum(lp["token_logprobs"][10:-1]) < 0 and all(v is not None for v in lp["token_logprobs"][1:])
    text = out["choices"][0]["text"]
    assert text.startswith(PROMPT) and lp["text_offset"][-1] == len(PROMPT)  # the completion starts after it
    assert lp["text_offset"][:-1] == list(range(len(PROMPT)))


def test_text_offset_indexes_the_echoed_text(server: LiveServer) -> None:
    out = post(server, {"prompt": PROMPT, "max_tokens": 6, "echo": True, "logprobs": 0, "temperature": 0,
                        "ignore_eos": True})
    text, lp = out["choices"][0]["text"], out["choices"][0]["logprobs"]
    offsets = [*lp["text_offset"], len(text)]
    assert lp["text_offset"][len(PROMPT)] == 56
    assert [text[a:b] for a, b in itertools.pairwise(offsets)] == lp["tokens"]
    plain = post(server, {"prompt": PROMPT, "max_tokens": 6, "logprobs": 0, "temperature": 0, "ignore_eos": True})
    assert plain["choices"][0]["logprobs"]["text_offset"] == list(range(6))  # without echo: from the completion


def test_vllm_prompt_logprobs(server: LiveServer) -> None:
    ids = server.models["tiny-gpt"].tokenizer.encode(PROMPT)
    out = post(server, {"prompt": PROMPT, "max_tokens": 1, "prompt_logprobs": 3, "temperature": 0})
    rows = out["choices"][0]["prompt_logprobs"]
    assert out["choices"][0]["logprobs"] is None and len(rows) == len(ids) and rows[0] is None
    want, top_ids = reference(server, ids, 3)
    for i, row in enumerate(rows[1:]):
        assert row[str(ids[i + 1])]["logprob"] == pytest.approx(want[i], abs=1e-4)
        assert [row[str(t)]["rank"] for t in top_ids[i]] == [1, 2, 3]
        assert set(row) == {str(t) for t in [*top_ids[i], ids[i + 1]]}
    post(server, {"prompt": PROMPT, "prompt_logprobs": 99}, 400)
    err = post(server, {"model": "tiny-mt", "prompt": "A man.", "echo": True, "logprobs": 1}, 400)
    assert "decoder-only" in err["error"]["message"]


def test_streamed_scoring_and_usage_null_until_the_last_chunk(server: LiveServer) -> None:
    body = {"model": "tiny-gpt", "prompt": PROMPT, "max_tokens": 4, "echo": True, "logprobs": 1, "temperature": 0,
            "ignore_eos": True}
    whole = post(server, body)["choices"][0]
    for include in (True, False):
        streamed = {**body, "stream": True, "stream_options": {"include_usage": include}}
        with httpx.stream("POST", f"{server.url}/v1/completions", json=streamed, timeout=60) as r:
            chunks = [data for _, data in sse_events(r.iter_lines()) if data != "[DONE]"]
        body_chunks = chunks[:-1] if include else chunks
        assert all(("usage" in c and c["usage"] is None) == include for c in body_chunks)
        assert include is False or chunks[-1]["usage"]["completion_tokens"] == 4
        text = "".join(c["choices"][0]["text"] for c in body_chunks)
        lps = [c["choices"][0]["logprobs"] for c in body_chunks if c["choices"][0]["logprobs"]]
        assert text == whole["text"] and body_chunks[0]["choices"][0]["text"] == PROMPT
        for key in ("tokens", "token_logprobs", "text_offset"):
            assert [v for lp in lps for v in lp[key]] == pytest.approx(whole["logprobs"][key], abs=1e-6)


def test_max_tokens_0_and_the_omitted_default(server: LiveServer) -> None:
    assert "max_tokens" in post(server, {"prompt": PROMPT, "max_tokens": 0}, 400)["error"]["message"]
    long = "ROMEO: " * 17 + "b"  # 120 of the 128 positions
    out = post(server, {"prompt": long, "temperature": 0, "ignore_eos": True})  # omitted: 16 capped to the room
    assert out["usage"]["completion_tokens"] == 8 and out["choices"][0]["finish_reason"] == "length"
    assert post(server, {"prompt": long, "max_tokens": None, "ignore_eos": True})["usage"]["completion_tokens"] == 8
    native = httpx.post(f"{server.url}/v1/generate", json={"model": "tiny-gpt", "prompt": long, "ignore_eos": True})
    assert native.status_code == 200 and native.json()["usage"]["completion_tokens"] == 8
    err = post(server, {"prompt": long, "max_tokens": 16}, 400)["error"]  # asked for: refused, not capped
    assert err["code"] == "context_length_exceeded"
    full = post(server, {"prompt": "ROMEO: " * 18 + "bu", "max_tokens": 0, "echo": True, "logprobs": 0})
    assert len(full["choices"][0]["logprobs"]["tokens"]) == 128  # scoring can fill the whole context


def test_null_fields_mean_their_defaults(server: LiveServer) -> None:
    nulls = dict.fromkeys(["max_tokens", "temperature", "top_p", "n", "stop", "logprobs", "echo", "stream",
                           "stream_options", "suffix", "user", "logit_bias", "best_of", "presence_penalty",
                           "frequency_penalty", "top_k", "min_p", "min_tokens", "prompt_logprobs"])
    with_nulls = post(server, {"prompt": PROMPT, "seed": 3, **nulls})
    plain = post(server, {"prompt": PROMPT, "seed": 3})
    assert with_nulls["choices"][0]["text"] == plain["choices"][0]["text"]
    assert with_nulls["usage"] == plain["usage"]


def test_vllm_sampling_extras(server: LiveServer) -> None:
    greedy = {"prompt": PROMPT, "max_tokens": 12, "temperature": 0}
    first = post(server, {**greedy, "logprobs": 0})["choices"][0]["logprobs"]["tokens"][0]
    first_id = server.models["tiny-gpt"].tokenizer.encode(first)[0]
    stopped = post(server, {**greedy, "stop_token_ids": [first_id]})
    assert stopped["usage"]["completion_tokens"] <= 1 and stopped["choices"][0]["finish_reason"] == "stop"
    held = post(server, {**greedy, "stop_token_ids": [first_id], "min_tokens": 4})
    assert held["usage"]["completion_tokens"] >= 4
    seeded = {"prompt": PROMPT, "max_tokens": 12, "seed": 9}
    assert post(server, {**seeded, "top_k": -1})["choices"][0]["text"] == post(server, seeded)["choices"][0]["text"]
    for extra in ({"min_p": 0.05}, {"repetition_penalty": 1.2}, {"ignore_eos": True}, {"skip_special_tokens": True},
                  {"use_beam_search": False}, {"add_special_tokens": True}, {"best_of": 1}):
        post(server, {**seeded, **extra})
    text = post(server, {**greedy, "ignore_eos": True})["choices"][0]["text"]
    stop = text[3:5]
    kept = post(server, {**greedy, "ignore_eos": True, "stop": [stop], "include_stop_str_in_output": True})
    assert kept["choices"][0]["text"] == text[: text.index(stop) + len(stop)]
    for field, value in (("skip_special_tokens", False), ("guided_regex", "a+["),
                         ("best_of", 3), ("logit_bias", {"5": 1.0}), ("no_such_field", 1)):
        err = post(server, {**greedy, field: value}, 400)["error"]
        assert err["param"] == field and field in err["message"]
    assert post(server, {**greedy, "min_tokens": 13}, 400)["error"]["param"] == "min_tokens"


def test_vllm_tokenizer_endpoints_and_version(server: LiveServer) -> None:
    ours = httpx.post(f"{server.url}/v1/tokenize", json={"model": "tiny-gpt", "text": PROMPT}).json()
    r = httpx.post(f"{server.url}/tokenize", json={"model": "tiny-gpt", "prompt": PROMPT, "add_special_tokens": False,
                                                   "return_token_strs": True})
    assert r.status_code == 200, r.text
    assert r.json() == {"count": ours["count"], "max_model_len": 128, "tokens": ours["tokens"],
                        "token_strs": ours["token_strings"]}
    back = httpx.post(f"{server.url}/detokenize", json={"model": "tiny-gpt", "tokens": ours["tokens"]}).json()
    assert back == {"prompt": PROMPT}
    assert httpx.post(f"{server.url}/detokenize", json={"tokens": [10**6]}).status_code == 400
    info = httpx.get(f"{server.url}/tokenizer_info", params={"model": "tiny-gpt"}).json()
    tok = server.models["tiny-gpt"].tokenizer
    assert (info["eos_token"], info["eos_token_id"], info["model_max_length"]) == ("</s>", tok.eos_id, 128)
    assert httpx.get(f"{server.url}/tokenizer_info", params={"model": "nope"}).status_code == 404
    assert httpx.get(f"{server.url}/version").json()["version"]
    cards = httpx.get(f"{server.url}/v1/models").json()["data"]
    assert {c["id"]: c["max_model_len"] for c in cards} == {"tiny-gpt": 128, "tiny-mt": 128}

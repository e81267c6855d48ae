"""SmolLM2-135M-Instruct (its GGUF file) served on loopback, against transformers loading the same file with its own
GGUF reader: concurrent greedy completions token for token, prompt log-probs, the chat template's prompt, greedy
chat replies ending at <|im_end|>, streaming, and the official `openai` SDK."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import torch
from support import LiveServer, settings_for, sse_events

from service.schemas.chat import ChatCompletionRequest
from service.serving.chat_prompt import chat_prompt

NAME = "smollm2-135m-instruct"
EOS = 2  # <|im_end|>
PROMPTS = [
    "The capital of France is", "Once upon a time, there was a", "def fibonacci(n):", "The three primary colors are",
    "Water boils at", "My favourite recipe for pancakes", "In 1969, the first man", "Photosynthesis is the process",
    "Here is a list of fruits:\n1.", "The quick brown fox", "To be or not to be,", "import numpy as np\n",
    "Q: What is 2 + 2?\nA:", "The largest ocean on Earth", "Dear Sir or Madam,", "Les chats sont",
]
CHATS: list[list[dict[str, str]]] = [
    [{"role": "system", "content": "You are a terse assistant."}, {"role": "user", "content": "What is 2 + 2?"}],
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello! How can I help you today?"},
     {"role": "user", "content": "Name one color of the rainbow."}],
]


@pytest.fixture(scope="module")
def server(smollm2_gguf: Path) -> Iterator[LiveServer]:
    s = LiveServer(settings_for(None, models=[smollm2_gguf], kv_cache_blocks=None, block_size=16, max_model_len=512))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def hf(smollm2_gguf: Path) -> tuple[Any, Any]:
    """(model, tokenizer) from transformers' own GGUF loader, offline, float32."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("TRANSFORMERS_OFFLINE", "1")
        from transformers import AutoModelForCausalLM, AutoTokenizer

        d, name = smollm2_gguf.parent, smollm2_gguf.name
        tok = AutoTokenizer.from_pretrained(d, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=torch.float32).eval()
    return model, tok


def hf_generate(hf: tuple[Any, Any], ids: list[int], **kw: Any) -> tuple[list[int], list[float]]:
    """Greedy new token ids alone (batch 1, no padding), and each one's log-prob under the raw logits."""
    model, _ = hf
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             do_sample=False, output_logits=True, return_dict_in_generate=True, pad_token_id=EOS, **kw)
    new = out.sequences[0, len(ids):].tolist()
    lps = [float(torch.log_softmax(step[0].float(), -1)[t]) for step, t in zip(out.logits, new, strict=False)]
    return new, lps


def pieces(tok: Any, ids: list[int]) -> list[str]:
    return [tok.decode([i]) for i in ids]


def template_ids(tok: Any, messages: list[dict[str, str]]) -> list[int]:
    return list(tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)["input_ids"])


def post(server: LiveServer, path: str, body: dict[str, Any]) -> dict[str, Any]:
    r = httpx.post(f"{server.url}{path}", json={"model": NAME, **body}, timeout=300)
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


@pytest.mark.slow  # ~75 s on 2 cores, most of it transformers generating 16 x 64 tokens one prompt at a time
def test_16_concurrent_greedy_completions_equal_transformers_generate(server: LiveServer, hf: tuple[Any, Any]) -> None:
    # min_tokens mirrors min_new_tokens (EOS masked until 64); ignore_eos alone would let EOS be chosen and go on
    body = {"max_tokens": 64, "temperature": 0, "ignore_eos": True, "min_tokens": 64, "logprobs": 1}
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        outs = list(pool.map(lambda p: post(server, "/v1/completions", {"prompt": p, **body}), PROMPTS))
    _, tok = hf
    for prompt, out in zip(PROMPTS, outs, strict=True):
        ids = tok(prompt)["input_ids"]
        want, want_lps = hf_generate(hf, ids, max_new_tokens=64, min_new_tokens=64)
        choice = out["choices"][0]
        assert out["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 64, "total_tokens": len(ids) + 64}
        assert choice["finish_reason"] == "length"
        assert choice["logprobs"]["tokens"] == pieces(tok, want), prompt  # one token text per id, in order
        assert choice["text"] == tok.decode(want, skip_special_tokens=True), prompt
        # a different id with the same text would not have the same log-prob: the ids are the same
        assert choice["logprobs"]["token_logprobs"] == pytest.approx(want_lps, abs=1e-4), prompt


def test_prompt_logprobs_equal_a_transformers_forward(server: LiveServer, hf: tuple[Any, Any]) -> None:
    model, tok = hf
    prompts = PROMPTS[:3]
    out = post(server, "/v1/completions", {"prompt": prompts, "max_tokens": 0, "echo": True, "logprobs": 1,
                                          "prompt_logprobs": 0})
    assert len(out["choices"]) == len(prompts)
    for prompt, choice in zip(prompts, sorted(out["choices"], key=lambda c: c["index"]), strict=True):
        ids = tok(prompt)["input_ids"]
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)
        want = [float(logp[i - 1, ids[i]]) for i in range(1, len(ids))]
        lp = choice["logprobs"]
        assert choice["text"] == prompt and lp["tokens"] == pieces(tok, ids)
        assert lp["token_logprobs"][0] is None
        assert lp["token_logprobs"][1:] == pytest.approx(want, abs=1e-4)
        vllm = choice["prompt_logprobs"]  # vLLM's shape names the token ids
        assert vllm[0] is None and [int(next(iter(d))) for d in vllm[1:]] == ids[1:]
        assert [next(iter(d.values()))["logprob"] for d in vllm[1:]] == pytest.approx(want, abs=1e-4)


@pytest.mark.parametrize("messages", CHATS, ids=["system+user", "user", "multi-turn"])
def test_chat_prompt_is_the_checkpoint_template_as_transformers_renders_it(
        server: LiveServer, hf: tuple[Any, Any], messages: list[dict[str, str]]) -> None:
    _, tok = hf
    text, ids = chat_prompt(server.models[NAME], ChatCompletionRequest(model=NAME, messages=messages))
    assert text == tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert ids == template_ids(tok, messages)


def chat_reference(hf: tuple[Any, Any], messages: list[dict[str, str]]) -> tuple[list[int], list[float]]:
    """transformers' greedy reply to the template's ids, ending with the <|im_end|> it must reach, and log-probs."""
    new, lps = hf_generate(hf, template_ids(hf[1], messages), max_new_tokens=96)
    assert new[-1] == EOS and EOS not in new[:-1], "the reference reply did not end within 96 tokens"
    return new, lps


@pytest.mark.parametrize("messages", CHATS, ids=["system+user", "user", "multi-turn"])
def test_greedy_chat_equals_transformers_and_stops_at_im_end(
        server: LiveServer, hf: tuple[Any, Any], messages: list[dict[str, str]]) -> None:
    _, tok = hf
    want, want_lps = chat_reference(hf, messages)
    body = {"messages": messages, "max_tokens": 96, "temperature": 0, "logprobs": True}
    out = post(server, "/v1/chat/completions", body)
    choice = out["choices"][0]
    assert choice["message"]["content"] == tok.decode(want, skip_special_tokens=True)
    assert choice["finish_reason"] == "stop"
    # the reply's tokens, and the <|im_end|> that ended it where the server lists and counts it (vLLM does)
    content = choice["logprobs"]["content"]
    assert len(content) in (len(want) - 1, len(want))
    assert [c["token"] for c in content[: len(want) - 1]] == pieces(tok, want[:-1])
    # every step's log-prob depends on the whole prompt: the same values mean the same prompt ids were served
    assert [c["logprob"] for c in content] == pytest.approx(want_lps[: len(content)], abs=1e-4)
    n = len(template_ids(tok, messages))
    assert out["usage"] == {"prompt_tokens": n, "completion_tokens": len(content), "total_tokens": n + len(content)}
    # streamed, the same request's deltas join into the same reply, and the last choice chunk says "stop"
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json={"model": NAME, **body, "stream": True},
                      timeout=300) as r:
        assert r.status_code == 200
        events = [data for _, data in sse_events(r.iter_lines())]
    assert events[-1] == "[DONE]"
    chunks = [e["choices"][0] for e in events[:-1] if e["choices"]]
    assert "".join(c["delta"].get("content") or "" for c in chunks) == choice["message"]["content"]
    assert [c["finish_reason"] for c in chunks if c["finish_reason"]] == ["stop"]


def test_openai_sdk_chat_plain_and_streamed_agree(server: LiveServer, hf: tuple[Any, Any]) -> None:
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0, timeout=300)
    messages: Any = CHATS[1]
    want = hf[1].decode(chat_reference(hf, CHATS[1])[0], skip_special_tokens=True)
    plain = client.chat.completions.create(model=NAME, messages=messages, max_tokens=96, temperature=0)
    assert plain.model == NAME and plain.object == "chat.completion"
    assert plain.choices[0].message.role == "assistant"
    assert plain.choices[0].message.content == want and plain.choices[0].finish_reason == "stop"
    stream = client.chat.completions.create(model=NAME, messages=messages, max_tokens=96, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert text == want and finish == ["stop"]
    usage = chunks[-1].usage
    assert usage is not None and plain.usage is not None
    assert (usage.prompt_tokens, usage.completion_tokens) == (plain.usage.prompt_tokens, plain.usage.completion_tokens)

"""Limits and bad input: every refusal is a 4xx in OpenAI's error shape naming the field and the limit, the
waiting queue pushes back with 429 + Retry-After, and nothing a client sends yields a 5xx."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from support import slow_steps

LIMITS = dict(max_tokens_limit=8, max_n=2, max_stop_sequences=2, max_stop_length=5, max_logprobs=3,
              max_body_bytes=4096)


def assert_refused(r: httpx.Response, status: int, param: str | None, *words: str) -> None:
    """A refusal in OpenAI's shape whose message names the field and the limit, with nothing internal in it."""
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    if param is not None:
        assert err["param"] == param, err
    for w in words:
        assert w in err["message"], (w, err)
    assert "Traceback" not in r.text and ".py" not in r.text and "/tmp" not in r.text


def test_each_limit_names_its_field_and_value(make_server: Any) -> None:
    s = make_server(**LIMITS)
    gen, cmpl = f"{s.url}/v1/generate", f"{s.url}/v1/completions"
    with httpx.Client(timeout=30) as c:
        assert_refused(c.post(gen, json={"prompt": "a", "max_tokens": 9}), 400, "max_tokens", "9", "8")
        assert_refused(c.post(cmpl, json={"prompt": "a", "n": 3, "max_tokens": 1}), 400, "n", "3", "2")
        assert_refused(c.post(gen, json={"prompt": "a", "stop": ["x", "y", "z"]}), 400, "stop", "3", "2")
        assert_refused(c.post(gen, json={"prompt": "a", "stop": "toolong"}), 400, "stop", "7", "5")
        assert_refused(c.post(gen, json={"prompt": "a", "logprobs": 4, "max_tokens": 1}), 400, "logprobs", "4", "3")
        # tiny-gpt's context is 128 tokens (one per character)
        r = c.post(gen, json={"prompt": "a" * 125, "max_tokens": 8})
        assert_refused(r, 400, "prompt", "128", "133")
        assert r.json()["error"]["code"] == "context_length_exceeded"
        assert_refused(c.post(gen, json={"prompt": "x" * 5000}), 413, None, "5", "4096")

        def chunked() -> Iterator[bytes]:  # no Content-Length: the server counts the body as it arrives
            yield b'{"prompt": "'
            for _ in range(10):
                yield b"a" * 1000
            yield b'"}'

        r = c.post(gen, content=chunked(), headers={"Content-Type": "application/json"})
        assert "content-length" not in r.request.headers
        assert_refused(r, 413, "body", "4096")
        # just under the limits works
        r = c.post(cmpl, json={"prompt": "ab", "n": 2, "max_tokens": 8, "stop": ["x", "yy"], "logprobs": 3})
        assert r.status_code == 200, r.text


JUNK: list[tuple[str, bytes]] = [
    ("/v1/generate", b"{bad json"),
    ("/v1/generate", b""),
    ("/v1/generate", b"[1, 2, 3]"),
    ("/v1/generate", b"null"),
    ("/v1/generate", b"\xff\xfe\x00garbage"),
    ("/v1/generate", b'{"prompt": {"a": [1, {"b": null}]}}'),
    ("/v1/generate", b'{"prompt": "a", "max_tokens": "many"}'),
    ("/v1/generate", b'{"prompt": "a", "max_tokens": 1e400}'),
    ("/v1/generate", b'{"prompt": "a", "max_tokens": -1}'),
    ("/v1/generate", b'{"prompt": "a", "max_tokens": 99999999999999999999999999999}'),
    ("/v1/generate", b'{"prompt": "a", "temperature": NaN}'),
    ("/v1/generate", b'{"prompt": "a", "temperature": Infinity}'),
    ("/v1/generate", b'{"prompt": "a", "seed": -5}'),
    ("/v1/generate", b'{"prompt": "a", "seed": 1e30}'),
    ("/v1/generate", b'{"prompt": "a", "repetition_penalty": 1e-300}'),
    ("/v1/generate", b'{"prompt": "a", "unknown_field": 1}'),
    ("/v1/generate", b'{"prompt": "\\ud800 lone surrogate"}'),
    ("/v1/generate", b'{"prompt": "a", "stop": ["\\udfff"]}'),
    ("/v1/generate", b'{"prompt": "", "model": "tiny-mt"}'),
    ("/v1/generate", b'{"prompt": "a", "model": "no-such-model"}'),
    ("/v1/generate", b'{"prompt": "a", "model": "../../etc/passwd"}'),
    ("/v1/generate", b'{"prompt": "a", "logprobs": 99999999999999999999999}'),
    ("/v1/completions", b'{"prompt": []}'),
    ("/v1/completions", b'{"prompt": [[]], "model": "tiny-mt"}'),
    ("/v1/completions", b'{"prompt": [1e400]}'),
    ("/v1/completions", b'{"prompt": [-1, 5]}'),
    ("/v1/completions", b'{"prompt": [[99999999999999999999]]}'),
    ("/v1/completions", b'{"prompt": [true, null]}'),
    ("/v1/completions", b'{"prompt": "a", "n": 0}'),
    ("/v1/completions", b'{"prompt": "a", "best_of": 5}'),
    ("/v1/completions", b'{"prompt": "a", "logit_bias": {"1": 5}}'),
    ("/v1/completions", b'{"prompt": "a", "stream_options": "yes"}'),
    ("/v1/tokenize", b'{"text": "\\ud800"}'),
    ("/v1/tokenize", b'{"text": 5}'),
    ("/v1/detokenize", b'{"tokens": [-1]}'),
    ("/v1/detokenize", b'{"tokens": [1e400]}'),
    ("/v1/detokenize", b'{"tokens": "abc"}'),
]

ODD_BUT_VALID: list[dict[str, Any]] = [
    {"prompt": ""},
    {"prompt": "\u00e9\u00e8 \U0001f600 \u4e2d\u6587 \u202e\u0000"},
    {"prompt": "a", "temperature": 1e-300},
    {"prompt": "a", "temperature": 0.001, "top_p": 1e-300},
    {"prompt": "a", "top_k": 10**30},
    {"prompt": "a", "stop": ["", "\u00e9"], "stop_token_ids": [10**30, -3]},
    {"prompt": "a", "repetition_penalty": 0.01, "presence_penalty": 2, "frequency_penalty": -2, "temperature": 2},
    {"prompt": "a", "seed": 2**63 - 1, "temperature": 1.5},
    {"prompt": "a", "logprobs": 0, "stream": True},
]


def test_nothing_a_client_sends_yields_a_5xx(make_server: Any) -> None:
    s = make_server(max_tokens_limit=8)
    with httpx.Client(base_url=s.url, timeout=30, headers={"Content-Type": "application/json"}) as c:
        for path, body in JUNK:
            r = c.post(path, content=body)
            assert 400 <= r.status_code < 500, (path, body, r.status_code, r.text)
            assert_refused(r, r.status_code, None)
        for valid in ODD_BUT_VALID:
            r = c.post("/v1/generate", json={"max_tokens": 4, **valid})
            assert r.status_code == 200, (valid, r.text)
            assert "event: error" not in r.text
        for path in ("/v1/models/%00", "/v1/models/..%2F..%2Fetc", "/v1/models/" + "x" * 5000, "/nope"):
            assert c.get(path).status_code == 404
        assert c.delete("/v1/generate").status_code == 405
        assert c.get("/health").status_code == 200  # and the engine lived through all of it


def _post_many(url: str, bodies: list[dict[str, Any]]) -> list[httpx.Response]:
    async def run() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=60) as c:
            return await asyncio.gather(*(c.post(url, json=b) for b in bodies))

    return asyncio.run(run())


def test_full_queue_answers_429_with_retry_after(make_server: Any) -> None:
    s = make_server(max_num_seqs=1, max_waiting_requests=2, max_waiting_tokens=40, max_tokens_limit=64)
    body = {"prompt": "ROMEO:", "max_tokens": 40, "ignore_eos": True, "temperature": 0}
    responses = _post_many(f"{s.url}/v1/generate", [body] * 12)
    codes = sorted(r.status_code for r in responses)
    assert set(codes) == {200, 429}, codes
    for r in responses:
        if r.status_code == 429:
            assert_refused(r, 429, None, "limit 2")
            assert int(r.headers["Retry-After"]) >= 1
        else:
            assert r.json()["usage"]["completion_tokens"] == 40
    # the token bound: waiting prompts may hold 40 tokens at most
    many = [{"prompt": "x" * 30, "max_tokens": 40, "ignore_eos": True}] * 4
    codes = [r.status_code for r in _post_many(f"{s.url}/v1/generate", many)]
    assert 429 in codes and 200 in codes, codes
    assert s.models["tiny-gpt"].engine.blocks.num_free == s.models["tiny-gpt"].engine.blocks.num_blocks


def test_queue_timeout_and_request_deadline_end_with_abort(make_server: Any) -> None:
    s = make_server(max_num_seqs=1, queue_timeout=0.1, max_tokens_limit=120)
    engine = s.models["tiny-gpt"].engine
    slow_steps(engine, 0.005)  # 5 ms a step: the long request takes over 0.6 s on any machine
    long = {"prompt": "a", "max_tokens": 120, "ignore_eos": True, "temperature": 0}

    async def run() -> tuple[httpx.Response, httpx.Response]:
        async with httpx.AsyncClient(base_url=s.url, timeout=60) as c:
            first = asyncio.create_task(c.post("/v1/generate", json=long))
            await asyncio.sleep(0.05)
            second = await c.post("/v1/generate", json={"prompt": "b", "max_tokens": 4})
            return await first, second

    first, second = asyncio.run(run())
    assert first.json()["finish_reason"] == "length"
    assert first.json()["timing"]["total_time"] > 0.6  # so the second one waited past queue_timeout
    assert second.json()["finish_reason"] == "abort"
    assert second.json()["usage"]["completion_tokens"] == 0
    # X-Request-Timeout: generation still running at the deadline ends with finish_reason "abort"
    with httpx.Client(base_url=s.url, timeout=60) as c:
        r = c.post("/v1/generate", json={**long, "stream": True}, headers={"X-Request-Timeout": "0.05"})
        assert r.status_code == 200
        assert '"finish_reason":"abort"' in r.text
        assert r.text.count("event: token") < 120
        r = c.post("/v1/generate", json={"prompt": "a", "max_tokens": 4, "ignore_eos": True},
                   headers={"X-Request-Timeout": "30"})
        assert r.json()["finish_reason"] == "length"
        for bad in ("soon", "-1", "0", "nan", "inf"):
            assert_refused(c.post("/v1/generate", json={"prompt": "a"}, headers={"X-Request-Timeout": bad}), 400,
                           "X-Request-Timeout")


@pytest.mark.parametrize("stream", [False, True])
def test_sampling_blowups_fail_one_request_not_the_engine(make_server: Any, stream: bool) -> None:
    """Parameters at the edge of what float32 can hold sample fine; the engine survives them all."""
    s = make_server(max_tokens_limit=8)
    bodies = [{"prompt": "ab", "max_tokens": 4, "stream": stream, **b} for b in ODD_BUT_VALID[2:7]]
    for r in _post_many(f"{s.url}/v1/generate", bodies):
        assert r.status_code == 200, r.text
    assert s.models["tiny-gpt"].engine.dead is None

"""POST /v1/generate on a live server: batched equals alone equals the reference decoder, streamed equals not
streamed, a small KV pool preempts without changing outputs, clients who leave are aborted, bad input is 4xx."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from support import LiveServer, slow_steps, sse_events

from model.checkpoint import Checkpoint, load_checkpoint
from model.generate import GenerationConfig, generate

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models on a shared CPU: one thread is faster

PROMPTS = [
    "ROMEO:", "JULIET: O Romeo, Romeo", "a", "Zwei Hunde spielen im Schnee.", "It is the east, and Juliet",
    "Two dogs play in the snow.", "But soft, what light through yonder window breaks?", "O", "Deny thy father",
    "A man rides a bike.", "wherefore art thou", "Ein Mann", "JULIET:", "the sun.\n", "refuse thy name", "It",
]
assert len(set(PROMPTS)) == 16




@pytest.fixture(scope="module")
def gpt(server: LiveServer) -> Checkpoint:
    """The checkpoint the shared server serves as tiny-gpt, loaded again for the reference decoder."""
    assert server.settings.models_dir is not None
    return load_checkpoint(server.settings.models_dir / "tiny-gpt")


def post_all(url: str, bodies: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Send every body at once (one connection each) and return the JSON answers in order."""

    async def main() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=url, timeout=60, limits=httpx.Limits(max_connections=64)) as c:
            return await asyncio.gather(*(c.post("/v1/generate", json=b) for b in bodies))

    responses = asyncio.run(main())
    for r in responses:
        assert r.status_code == 200, r.text
    return [r.json() for r in responses]


def post_alone(url: str, bodies: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for b in bodies:
        r = httpx.post(f"{url}/v1/generate", json=b, timeout=60)
        assert r.status_code == 200, r.text
        out.append(r.json())
    return out


def stream(url: str, body: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    with httpx.stream("POST", f"{url}/v1/generate", json={**body, "stream": True}, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        return list(sse_events(r.iter_lines()))


def test_ready_and_both_models_listed(server: LiveServer) -> None:
    assert httpx.get(f"{server.url}/ready").status_code == 200
    cards = httpx.get(f"{server.url}/v1/models").json()["data"]
    assert [c["id"] for c in cards] == ["tiny-gpt", "tiny-mt"]
    assert [c["details"]["architecture"] for c in cards] == ["decoder-only", "encoder-decoder"]


def test_16_concurrent_greedy_requests_equal_alone_and_the_reference(server: LiveServer, gpt: Checkpoint) -> None:
    bodies = [{"prompt": p, "max_tokens": 40, "temperature": 0} for p in PROMPTS]
    together = post_all(server.url, bodies)
    alone = post_alone(server.url, bodies)
    tok = gpt.tokenizer
    for prompt, a, t in zip(PROMPTS, alone, together, strict=True):
        ref = generate(gpt.model, tok.encode(prompt), GenerationConfig(max_new_tokens=40, eos_id=tok.eos_id))
        assert t["token_ids"] == a["token_ids"] == ref, prompt
        assert t["text"] == a["text"] == tok.decode(ref)
        assert t["usage"] == {"prompt_tokens": len(prompt), "completion_tokens": len(ref),
                              "total_tokens": len(prompt) + len(ref)}
        assert t["finish_reason"] == ("length" if len(ref) == 40 else "stop")


def test_seeded_sampling_is_the_same_alone_and_among_16(server: LiveServer, gpt: Checkpoint) -> None:
    bodies = [{"prompt": p, "max_tokens": 30, "temperature": 1.0, "top_p": 0.9, "seed": 1000 + i}
              for i, p in enumerate(PROMPTS)]
    together = [r["text"] for r in post_all(server.url, bodies)]
    alone = [r["text"] for r in post_alone(server.url, bodies)]
    assert together == alone
    # it really samples: another seed changes the text, and the draws are model/generate.py's
    other = post_alone(server.url, [{**bodies[0], "seed": 7}])[0]["text"]
    assert other != alone[0]
    tok = gpt.tokenizer
    cfg = GenerationConfig(max_new_tokens=30, temperature=1.0, top_p=0.9, seed=1000, eos_id=tok.eos_id)
    assert alone[0] == tok.decode(generate(gpt.model, tok.encode(PROMPTS[0]), cfg))


@pytest.mark.parametrize("sampling", [{"temperature": 0}, {"temperature": 1.0, "top_p": 0.9, "seed": 3}])
def test_streamed_text_equals_the_non_streamed_text(server: LiveServer, sampling: dict[str, Any]) -> None:
    for prompt in PROMPTS[:4]:
        body = {"prompt": prompt, "max_tokens": 25, "logprobs": 0, **sampling}
        whole = post_alone(server.url, [body])[0]
        events = stream(server.url, body)
        kinds = [e for e, _ in events]
        assert kinds == ["token"] * (len(kinds) - 1) + ["done"]
        tokens = [d for e, d in events if e == "token" and "token_id" in d]
        assert "".join(d["text"] for e, d in events if e == "token") == whole["text"]
        assert [d["token_id"] for d in tokens] == whole["token_ids"]
        assert all(d["logprob"] <= 0 for d in tokens)
        assert [d["logprob"] for d in tokens] == pytest.approx([t["logprob"] for t in whole["tokens"]], abs=1e-5)
        done = events[-1][1]
        assert done["finish_reason"] == whole["finish_reason"] and done["usage"] == whole["usage"]
        assert set(done["timing"]) == {"queue_time", "time_to_first_token", "total_time"}
        assert done["timing"]["total_time"] >= done["timing"]["time_to_first_token"] > 0


def test_a_stop_sequence_split_over_tokens_is_never_streamed(server: LiveServer) -> None:
    body: dict[str, Any] = {"prompt": "JULIET:", "max_tokens": 40, "temperature": 0, "ignore_eos": True}
    text = post_alone(server.url, [body])[0]["text"]
    stop = text[len(text) // 2 :][:3]  # three characters: three tokens of the char tokenizer, three SSE events
    assert len(stop) == 3
    expected = text[: text.index(stop)]
    body["stop"] = [stop, "never-seen"]
    whole = post_alone(server.url, [body])[0]
    assert whole["text"] == expected and whole["finish_reason"] == "stop"
    events = stream(server.url, body)
    pieces = [d["text"] for e, d in events if e == "token"]
    assert "".join(pieces) == expected and events[-1] == ("done", events[-1][1])
    assert events[-1][1]["finish_reason"] == "stop"


def test_a_small_kv_pool_preempts_and_changes_no_output(make_server: Callable[..., LiveServer],
                                                        server: LiveServer) -> None:
    small = make_server(kv_cache_blocks=32, block_size=4)  # 16 requests need ~300 blocks at their longest
    engine = small.models["tiny-gpt"].engine
    bodies = [{"prompt": p, "max_tokens": 40, "temperature": 0} for p in PROMPTS]
    got = post_all(small.url, bodies)
    assert engine.scheduler.num_preemptions > 0
    assert [r["token_ids"] for r in got] == [r["token_ids"] for r in post_all(server.url, bodies)]
    assert engine.blocks.num_free == engine.blocks.num_blocks == 32
    # sampled requests recompute after preemption and still draw the same tokens
    seeded = [{**b, "temperature": 1.0, "top_p": 0.9, "seed": i} for i, b in enumerate(bodies)]
    before = engine.scheduler.num_preemptions
    assert [r["text"] for r in post_all(small.url, seeded)] == [r["text"] for r in post_all(server.url, seeded)]
    assert engine.scheduler.num_preemptions > before
    assert engine.blocks.num_free == engine.blocks.num_blocks


class AbortSpy:
    """Records each abort the engine receives and the engine's step count at that moment (calls through)."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.calls: list[tuple[str, int]] = []
        self._abort = engine.abort
        engine.abort = self

    def __call__(self, request_id: str) -> None:
        self.calls.append((request_id, self.engine.steps))
        self._abort(request_id)


def wait_for_free_blocks(engine: Any, timeout: float = 5.0) -> int:
    """Poll until the pool is full again; return the engine's step count at that moment."""
    end = time.monotonic() + timeout
    while engine.blocks.num_free != engine.blocks.num_blocks:
        assert time.monotonic() < end, "the blocks did not come back"
        time.sleep(0.002)
    return int(engine.steps)


@pytest.fixture
def slow_server(make_server: Callable[..., LiveServer]) -> tuple[LiveServer, Any, AbortSpy]:
    s = make_server()
    engine = s.models["tiny-gpt"].engine
    slow_steps(engine, 0.02)
    return s, engine, AbortSpy(engine)


def test_a_client_leaving_a_stream_is_aborted_and_its_blocks_return_within_a_step(slow_server: Any) -> None:
    s, engine, spy = slow_server
    start = engine.steps
    body = {"prompt": "ROMEO:", "max_tokens": 120, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{s.url}/v1/generate", json=body, headers={"X-Request-ID": "leaver"}) as r:
        seen = 0
        for event, _ in sse_events(r.iter_lines()):
            seen += event == "token"
            if seen == 5:
                break  # leaving the block closes the connection mid-stream
    free_at = wait_for_free_blocks(engine)
    assert len(spy.calls) == 1 and spy.calls[0][0].startswith("gen-leaver-")
    assert free_at - spy.calls[0][1] <= 1, "the blocks took more than one step to come back"
    assert free_at - start < 60, "the request ran on after its client left"
    time.sleep(0.1)
    assert engine.steps == free_at and not engine.scheduler.has_work()


def test_a_client_timing_out_on_a_plain_request_is_aborted(slow_server: Any) -> None:
    s, engine, spy = slow_server
    start = engine.steps
    body = {"prompt": "ROMEO:", "max_tokens": 120, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{s.url}/v1/generate", json=body, headers={"X-Request-ID": "impatient"},
                   timeout=httpx.Timeout(5.0, read=0.3))
    free_at = wait_for_free_blocks(engine)
    assert len(spy.calls) == 1 and spy.calls[0][0].startswith("gen-impatient-")
    assert free_at - spy.calls[0][1] <= 1
    assert free_at - start < 60, "the request ran on after its client left"


BAD_BODIES: list[tuple[dict[str, Any], str]] = [
    ({"prompt": "a", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "a", "max_tokens": "many"}, "max_tokens"),
    ({"prompt": "a", "temperature": 2.5}, "temperature"),
    ({"prompt": "a", "top_p": 0}, "top_p"),
    ({"prompt": "a", "top_k": -2}, "top_k"),
    ({"prompt": "a", "seed": -3}, "seed"),
    ({"prompt": "a", "logprobs": -1}, "logprobs"),
    ({"prompt": "a", "stop": ["x"] * 50}, "stop"),
    ({"prompt": "a", "max_tokens": 10**9}, "max_tokens"),
    ({"prompt": "a", "colour": "blue"}, "colour"),
    ({"prompt": 12}, "prompt"),
    ({"max_tokens": 3}, "prompt"),
]


@pytest.mark.parametrize(("body", "field"), BAD_BODIES, ids=[f for _, f in BAD_BODIES])
def test_invalid_fields_are_400_naming_the_field(server: LiveServer, body: dict[str, Any], field: str) -> None:
    r = httpx.post(f"{server.url}/v1/generate", json=body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert field in err["message"] and err["param"] == field and err["type"] == "invalid_request_error"


def test_other_bad_requests_are_4xx_never_500(server: LiveServer) -> None:
    limit = server.models["tiny-gpt"].context_length
    r = httpx.post(f"{server.url}/v1/generate", json={"prompt": "a" * (limit + 10), "max_tokens": 1})
    assert r.status_code == 400 and f"maximum context length is {limit}" in r.json()["error"]["message"]
    assert r.json()["error"]["code"] == "context_length_exceeded"
    r = httpx.post(f"{server.url}/v1/generate", json={"prompt": "a" * (limit - 5), "max_tokens": 10})
    assert r.status_code == 400 and str(limit) in r.json()["error"]["message"]  # prompt + max_tokens
    r = httpx.post(f"{server.url}/v1/generate", json={"prompt": "a", "model": "no-such-model"})
    assert r.status_code == 404 and "no-such-model" in r.json()["error"]["message"]
    assert r.json()["error"]["param"] == "model"
    assert httpx.get(f"{server.url}/v1/models/no-such-model").status_code == 404
    r = httpx.post(f"{server.url}/v1/generate", content=b"{not json", headers={"content-type": "application/json"})
    assert 400 <= r.status_code < 500 and "error" in r.json()
    r = httpx.post(f"{server.url}/v1/generate", content=b"[1, 2]", headers={"content-type": "application/json"})
    assert 400 <= r.status_code < 500
    assert httpx.get(f"{server.url}/v1/generate").status_code == 405
    r = httpx.post(f"{server.url}/v1/generate", json={"prompt": "a", "stream": True, "max_tokens": 0})
    assert r.status_code == 400 and "max_tokens" in r.json()["error"]["message"]  # refused before streaming

"""The encoder-decoder checkpoint (tiny-mt) served: its outputs equal the reference decoder's, batched or alone,
streamed or not, with a KV pool that holds all requests or one that forces preemption."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import httpx
import openai
import pytest
from support import LiveServer, sse_events

from model.checkpoint import Checkpoint, load_checkpoint
from model.generate import GenerationConfig, generate

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models on a shared CPU: one thread is faster

SOURCES = [
    "Two dogs play in the snow.", "A man rides a bike.", "Zwei Hunde spielen im Schnee.", "the sun",
    "It is the east, and Juliet is the sun.", "O", "Ein Mann fährt Fahrrad.", "Deny thy father and refuse thy name.",
]




@pytest.fixture(scope="module")
def mt(server: LiveServer) -> Checkpoint:
    assert server.settings.models_dir is not None
    return load_checkpoint(server.settings.models_dir / "tiny-mt")


def reference(mt: Checkpoint, source: str, max_tokens: int, **sampling: Any) -> list[int]:
    tok = mt.tokenizer
    assert tok.bos_id is not None
    cfg = GenerationConfig(max_new_tokens=max_tokens, eos_id=tok.eos_id, **sampling)
    return generate(mt.model, [tok.bos_id], cfg, source=tok.encode(source))


def translate_all(url: str, bodies: list[dict[str, Any]]) -> list[dict[str, Any]]:
    async def main() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=url, timeout=60) as c:
            return await asyncio.gather(*(c.post("/v1/generate", json={"model": "tiny-mt", **b}) for b in bodies))

    out = []
    for r in asyncio.run(main()):
        assert r.status_code == 200, r.text
        out.append(r.json())
    return out


def test_served_translations_equal_the_reference_decoder(server: LiveServer, mt: Checkpoint) -> None:
    bodies = [{"prompt": s, "max_tokens": 30, "temperature": 0} for s in SOURCES]
    together = translate_all(server.url, bodies)
    alone = [translate_all(server.url, [b])[0] for b in bodies[:3]]
    for source, got in zip(SOURCES, together, strict=True):
        ref = reference(mt, source, 30)
        assert got["token_ids"] == ref, source
        assert got["text"] == mt.tokenizer.decode(ref)
        assert got["usage"]["prompt_tokens"] == len(mt.tokenizer.encode(source))  # the source is the prompt
    assert [a["token_ids"] for a in alone] == [t["token_ids"] for t in together[:3]]


def test_seeded_translation_equals_the_reference_sampler(server: LiveServer, mt: Checkpoint) -> None:
    bodies = [{"prompt": s, "max_tokens": 20, "temperature": 1.0, "top_p": 0.9, "seed": 40 + i}
              for i, s in enumerate(SOURCES)]
    for i, got in enumerate(translate_all(server.url, bodies)):
        assert got["token_ids"] == reference(mt, SOURCES[i], 20, temperature=1.0, top_p=0.9, seed=40 + i)


def test_streamed_and_openai_translations_match(server: LiveServer) -> None:
    body = {"model": "tiny-mt", "prompt": SOURCES[0], "max_tokens": 25, "temperature": 0}
    whole = translate_all(server.url, [body])[0]
    with httpx.stream("POST", f"{server.url}/v1/generate", json={**body, "stream": True}, timeout=60) as r:
        events = list(sse_events(r.iter_lines()))
    assert [e for e, _ in events].count("done") == 1 and events[-1][0] == "done"
    assert "".join(d.get("text", "") for e, d in events if e == "token") == whole["text"]
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0)
    c = client.completions.create(model="tiny-mt", prompt=SOURCES[0], max_tokens=25, temperature=0)
    assert c.choices[0].text == whole["text"]


def test_translations_survive_preemption(make_server: Callable[..., LiveServer], mt: Checkpoint) -> None:
    small = make_server(kv_cache_blocks=24, block_size=4)  # encoder K/V blocks count against the pool too
    engine = small.models["tiny-mt"].engine
    bodies = [{"prompt": s, "max_tokens": 40, "temperature": 0, "ignore_eos": True} for s in SOURCES]
    got = translate_all(small.url, bodies)
    assert engine.scheduler.num_preemptions > 0
    tok = mt.tokenizer
    assert tok.bos_id is not None
    for source, g in zip(SOURCES, got, strict=True):
        cfg = GenerationConfig(max_new_tokens=40, eos_id=None)  # ignore_eos: EOS is an ordinary token
        assert g["token_ids"] == generate(mt.model, [tok.bos_id], cfg, source=tok.encode(source)), source
    assert engine.blocks.num_free == engine.blocks.num_blocks


def test_an_empty_source_is_a_400(server: LiveServer) -> None:
    r = httpx.post(f"{server.url}/v1/generate", json={"model": "tiny-mt", "prompt": ""})
    assert r.status_code == 400 and "prompt" in r.json()["error"]["message"]


def test_the_default_max_tokens_is_sized_to_the_source(server: LiveServer, mt: Checkpoint) -> None:
    """2 x source tokens + 10, within the decoder's room after BOS (tiny-mt's context is 128): never a cut at 16."""
    long = " ".join(SOURCES[:5])
    lengths = [len(mt.tokenizer.encode(s)) for s in (SOURCES[0], long)]
    assert 2 * lengths[0] + 10 > 16 and 2 * lengths[1] + 10 > 127, lengths
    for source, n in zip((SOURCES[0], long), lengths, strict=True):
        got = translate_all(server.url, [{"prompt": source, "temperature": 0, "ignore_eos": True}])[0]
        assert got["usage"]["completion_tokens"] == min(2 * n + 10, 127), source

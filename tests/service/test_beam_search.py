"""Beam search through the API equals the reference decoder's beam (model/generate.py), for the translator and
for the GPT, alone and while other requests run; n hypotheses come back best first; what a beam cannot do is a
400 naming the field."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx
import pytest
from support import LiveServer

from model.checkpoint import load_checkpoint
from model.generate import GenerationConfig, beam_search

pytestmark = pytest.mark.usefixtures("one_thread")

SOURCES = ["Two dogs play in the snow.", "A man rides a bike.", "Zwei Hunde spielen im Schnee."]
PROMPTS = ["ROMEO: What light", "JULIET: O Romeo", "a"]


def reference(checkpoints_dir: Path, name: str, text: str, width: int, max_tokens: int, alpha: float) -> str:
    ckpt = load_checkpoint(checkpoints_dir / name)
    tok, model = ckpt.tokenizer, ckpt.model.eval()
    cfg = GenerationConfig(max_new_tokens=max_tokens, num_beams=width, length_penalty=alpha, eos_id=tok.eos_id)
    if ckpt.config.is_encoder_decoder:
        return tok.decode(beam_search(model, [tok.bos_id or 0], cfg, source=tok.encode(text)))
    return tok.decode(beam_search(model, tok.encode(text), cfg))


@pytest.fixture
def server(make_server: Any) -> LiveServer:
    return make_server()  # type: ignore[no-any-return]


@pytest.mark.parametrize(("model", "texts"), [("tiny-mt", SOURCES), ("tiny-gpt", PROMPTS)])
def test_beam_search_via_the_api_equals_the_reference_beam(server: LiveServer, checkpoints_dir: Path, model: str,
                                                           texts: list[str]) -> None:
    async def main() -> None:
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:
            async def completions(text: str, width: int, alpha: float) -> list[str]:
                r = await client.post("/v1/completions", json={"model": model, "prompt": text, "max_tokens": 14,
                                                               "use_beam_search": True, "n": width,
                                                               "length_penalty": alpha})
                assert r.status_code == 200, r.text
                choices = r.json()["choices"]
                assert [c["index"] for c in choices] == list(range(len(choices))) and len(choices) == width
                return [c["text"] for c in choices]

            async def generate(text: str) -> str:
                r = await client.post("/v1/generate", json={"model": model, "prompt": text, "max_tokens": 14,
                                                            "beam_width": 4})
                assert r.status_code == 200, r.text
                return str(r.json()["text"])

            async def noise(i: int) -> None:  # sampled requests running beside the beams
                r = await client.post("/v1/completions", json={"model": model, "prompt": texts[i % len(texts)],
                                                               "max_tokens": 20, "temperature": 1.0, "seed": i})
                assert r.status_code == 200, r.text

            for text in texts:
                for width, alpha in ((4, 0.6), (2, 1.0)):
                    best = (await completions(text, width, alpha))[0]
                    assert best == reference(checkpoints_dir, model, text, width, 14, alpha), (text, width)
            together = await asyncio.gather(*(generate(t) for t in texts), *(noise(i) for i in range(6)))
            assert together[: len(texts)] == [reference(checkpoints_dir, model, t, 4, 14, 0.6) for t in texts]

    asyncio.run(main())


@pytest.mark.parametrize(("body", "field"), [
    ({"use_beam_search": True, "n": 2, "stream": True}, "stream"),
    ({"use_beam_search": True, "n": 2, "logprobs": 1}, "logprobs"),
    ({"use_beam_search": True, "n": 2, "stop": ["\n"]}, "stop"),
    ({"use_beam_search": True, "n": 99}, "n"),
])
def test_what_a_beam_cannot_do_is_refused_naming_the_field(server: LiveServer, body: dict[str, Any],
                                                            field: str) -> None:
    r = httpx.post(f"{server.url}/v1/completions", json={"model": "tiny-gpt", "prompt": "ROMEO:", **body}, timeout=30)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == field
    r = httpx.post(f"{server.url}/v1/generate", json={"model": "tiny-gpt", "prompt": "ROMEO:", "beam_width": 2,
                                                      "stream": True}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "stream", r.text


def test_a_beam_request_counts_once_in_the_metrics_as_its_usage_says(server: LiveServer) -> None:
    """One request of width 4 is dozens of engine requests (one per hypothesis per step); /metrics counts the
    user's request once, with the prompt once and the returned hypotheses' tokens, as its usage does."""
    def metric(name: str) -> float:  # summed over its other labels (finish_reason)
        return sum(float(line.rsplit(" ", 1)[1]) for line in httpx.get(f"{server.url}/metrics").text.splitlines()
                   if line.startswith(f"attnserve_{name}{{") and 'model="tiny-gpt"' in line)

    names = ("requests_finished_total", "prompt_tokens_total", "generation_tokens_total")
    before = [metric(n) for n in names]
    r = httpx.post(f"{server.url}/v1/completions", json={"model": "tiny-gpt", "prompt": PROMPTS[0], "max_tokens": 8,
                                                         "use_beam_search": True, "n": 4}, timeout=120)
    assert r.status_code == 200, r.text
    usage = r.json()["usage"]
    after = [metric(n) for n in names]
    assert [a - b for a, b in zip(after, before, strict=True)] == [1, usage["prompt_tokens"],
                                                                    usage["completion_tokens"]]

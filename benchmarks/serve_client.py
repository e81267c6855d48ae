"""The load generator's wire: prompts made through the server's tokenizer, one streamed request on the native
or the OpenAI API as the client sees it, and the server's step-time histograms. On aiohttp (a C HTTP parser, as
vLLM's benchmark uses): the client shares the machine with the server, and a pure-Python HTTP stack spent as
much CPU per streamed token as the server did."""

from __future__ import annotations

import json
import random
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Literal

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

Api = Literal["native", "openai"]


@dataclass(frozen=True)
class LoadSpec:
    """Where to send load and what every request asks for."""

    url: str
    model: str
    api: Api = "native"
    input_len: int = 32
    output_len: int = 128
    temperature: float = 0.0
    seed: int = 0
    timeout: float = 600.0
    api_key: str | None = None


@dataclass(frozen=True)
class Prompt:
    text: str
    ids: list[int]


@dataclass
class RequestResult:
    """One request as the client saw it; times in seconds from the moment it was sent."""

    ok: bool = False
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft: float = 0.0
    latency: float = 0.0
    itls: list[float] = field(default_factory=list)
    error: str = ""


# --- the wire ------------------------------------------------------------------------------------------------


async def sse_events(resp: aiohttp.ClientResponse) -> AsyncIterator[tuple[str, str]]:
    """(event, data) per Server-Sent Event; the event name is "message" when the server sends none."""
    buffer = b""
    async for chunk in resp.content.iter_any():
        buffer += chunk.replace(b"\r\n", b"\n")
        *events, buffer = buffer.split(b"\n\n")
        for raw in events:
            parsed = _sse_event(raw)
            if parsed is not None:
                yield parsed
    if buffer.strip():
        parsed = _sse_event(buffer)
        if parsed is not None:
            yield parsed


def _sse_event(raw: bytes) -> tuple[str, str] | None:
    event, data = "message", []
    for line in raw.decode().split("\n"):
        if line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].removeprefix(" "))
    return (event, "\n".join(data)) if data else None


def _tick(r: RequestResult, start: float, last: float) -> float:
    """Record the arrival of one streamed piece: the first is TTFT, later ones inter-token latencies."""
    now = time.perf_counter()
    if r.ttft == 0.0:
        r.ttft = now - start
    else:
        r.itls.append(now - last)
    return now


async def send_native(client: aiohttp.ClientSession, spec: LoadSpec, prompt: Prompt, seed: int) -> RequestResult:
    body = {"model": spec.model, "prompt": prompt.text, "max_tokens": spec.output_len, "temperature": spec.temperature,
            "ignore_eos": True, "stream": True, "seed": seed}
    r = RequestResult(prompt_tokens=len(prompt.ids))
    start = last = time.perf_counter()
    async with client.post(f"{spec.url}/v1/generate", json=body) as resp:
        if resp.status != 200:
            r.error = f"HTTP {resp.status}: {(await resp.text(errors='replace'))[:200]}"
            return r
        async for event, data in sse_events(resp):
            if event == "token" and '"token_id"' in data:
                last = _tick(r, start, last)
                r.output_tokens += 1
            elif event == "done":
                usage = json.loads(data)["usage"]
                r.prompt_tokens, r.output_tokens = usage["prompt_tokens"], usage["completion_tokens"]
                r.ok = True
            elif event == "error":
                r.error = data[:200]
    r.latency = time.perf_counter() - start
    if not r.ok and not r.error:
        r.error = "stream ended without a done event"
    return r


async def send_openai(client: aiohttp.ClientSession, spec: LoadSpec, prompt: Prompt, seed: int) -> RequestResult:
    body = {"model": spec.model, "prompt": prompt.ids, "max_tokens": spec.output_len, "temperature": spec.temperature,
            "ignore_eos": True, "stream": True, "seed": seed, "stream_options": {"include_usage": True}}
    r = RequestResult(prompt_tokens=len(prompt.ids))
    start = last = time.perf_counter()
    chunks = 0
    async with client.post(f"{spec.url}/v1/completions", json=body) as resp:
        if resp.status != 200:
            r.error = f"HTTP {resp.status}: {(await resp.text(errors='replace'))[:200]}"
            return r
        async for _, data in sse_events(resp):
            if data == "[DONE]":
                r.ok = not r.error
                break
            chunk = json.loads(data)
            if "error" in chunk:
                r.error = str(chunk["error"])[:200]
                continue
            choice = (chunk.get("choices") or [{}])[0]
            if choice and (choice.get("text") or not choice.get("finish_reason")):
                last = _tick(r, start, last)  # per chunk, as vLLM counts it; not a chunk that only ends the stream
                chunks += 1
            if chunk.get("usage"):  # vLLM and ours: a chunk of its own; llama.cpp: in the one that ends the stream
                r.prompt_tokens, r.output_tokens = chunk["usage"]["prompt_tokens"], chunk["usage"]["completion_tokens"]
            elif "predicted_n" in (chunk.get("timings") or {}):  # llama.cpp without usage: its own count
                r.output_tokens = int(chunk["timings"]["predicted_n"])
    r.latency = time.perf_counter() - start
    r.output_tokens = r.output_tokens or chunks
    if not r.ok and not r.error:
        r.error = "stream ended without [DONE]"
    return r


async def _json(client: aiohttp.ClientSession, method: str, url: str, body: Any = None) -> Any:
    async with client.request(method, url, json=body) as resp:
        resp.raise_for_status()
        return await resp.json()


async def make_prompts(client: aiohttp.ClientSession, spec: LoadSpec, n: int) -> list[Prompt]:
    """n prompts of spec.input_len tokens (exact for character vocabularies, nearest found for BPE)."""
    card = await _json(client, "GET", f"{spec.url}/v1/models/{spec.model}")
    vocab = int(card["details"]["vocab_size"])
    rng = random.Random(spec.seed)
    prompts = []
    for _ in range(n):
        ids = [rng.randrange(vocab) for _ in range(spec.input_len)]
        for attempt in range(8):
            text = (await _json(client, "POST", f"{spec.url}/v1/detokenize",
                                {"model": spec.model, "tokens": ids}))["text"]
            ids = (await _json(client, "POST", f"{spec.url}/v1/tokenize", {"model": spec.model, "text": text}))["tokens"]
            if len(ids) == spec.input_len or attempt == 7:
                break
            ids = ids[: spec.input_len] + [rng.randrange(vocab) for _ in range(spec.input_len - len(ids))]
        prompts.append(Prompt(text, ids))
    return prompts


# --- server-side step times ------------------------------------------------------------------------------------

STEP_SERIES = ("attnserve_decode_step_time_seconds", "attnserve_prefill_step_time_seconds",
               "attnserve_step_time_seconds")


async def scrape(client: aiohttp.ClientSession, spec: LoadSpec) -> dict[str, float]:
    """Sums and counts of the engine's step-time histograms for this model ({} if the server has no /metrics)."""
    try:
        async with client.get(f"{spec.url}/metrics") as resp:
            if resp.status != 200:
                return {}
            text = await resp.text()
    except aiohttp.ClientError:
        return {}
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.labels.get("model") == spec.model and s.name.removesuffix("_sum").removesuffix("_count") in STEP_SERIES:
                out[s.name] = s.value
    return out

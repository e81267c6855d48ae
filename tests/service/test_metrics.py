"""/metrics after a known load: every counter equals its exact expected value and every histogram counts exactly
the requests (or steps) it should. Requests use greedy decoding with ignore_eos + max_tokens, so each output
length is known before it is sent; max_num_seqs=1 makes the engine's steps countable too."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families
from support import read_sse

from service import __version__

MODEL = "tiny-gpt"
GEN, COMP, METRICS = "/v1/generate", "/v1/completions", "/metrics"
Labels = frozenset[tuple[str, str]]


@dataclass(frozen=True)
class Sent:
    """One engine request of the load: prompt length, tokens it must return, engine steps it takes."""

    prompt_tokens: int
    output_tokens: int
    scheduled: bool = True

    @property
    def steps(self) -> int:  # one sampled token per step (a stop token that ends it is returned too, as vLLM's)
        return self.output_tokens if self.scheduled else 0


class Scraper:
    """Parses /metrics into {sample name: {labels: value}} and counts its own scrapes (they are HTTP requests)."""

    def __init__(self, client: httpx.AsyncClient) -> None:
        self.client, self.scrapes = client, 0

    async def __call__(self) -> dict[str, dict[Labels, float]]:
        r = await self.client.get(METRICS)
        self.scrapes += 1
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
        out: dict[str, dict[Labels, float]] = {}
        for family in text_string_to_metric_families(r.text):
            for s in family.samples:
                out.setdefault(s.name, {})[frozenset(s.labels.items())] = s.value
        return out

    async def wait_for(self, name: str, labels: dict[str, str], value: float, timeout: float = 20.0) -> None:
        key = frozenset(labels.items())
        deadline = asyncio.get_running_loop().time() + timeout
        while (await self())[name].get(key) != value:
            assert asyncio.get_running_loop().time() < deadline, f"{name}{labels} never reached {value}"
            await asyncio.sleep(0.01)


def at(scrape: dict[str, dict[Labels, float]], name: str, **labels: str) -> float:
    return scrape[name][frozenset({"model": MODEL, **labels}.items())]


def series(scrape: dict[str, dict[Labels, float]], name: str) -> dict[Labels, float]:
    return {k: v for k, v in scrape[name].items() if v or dict(k).get("model") == MODEL}


def body(prompt: Any, max_tokens: int, **extra: Any) -> dict[str, Any]:
    return {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, **extra}


async def drive_load(url: str, encode: Callable[[str], list[int]]) -> tuple[list[Sent], Counter[tuple], int]:
    """The known load. Returns the engine requests, HTTP (model, route, method, status) counts, scrapes made."""
    sent: list[Sent] = []
    http: Counter[tuple] = Counter()
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        scrape = Scraper(client)

        async def post(path: str, payload: dict[str, Any], status: int, model: str = MODEL) -> httpx.Response:
            r = await client.post(path, json=payload)
            assert r.status_code == status, r.text
            http[(model, path, "POST", str(status))] += 1
            return r

        r1 = (await post(GEN, body("ROMEO:", 5), 200)).json()
        sent.append(Sent(len(encode("ROMEO:")), 5))
        async with client.stream("POST", GEN, json=body("JULIET:", 7, stream=True)) as resp:
            assert sum(e == "token" and "token_id" in d for e, d in await read_sse(resp)) == 7
        http[(MODEL, GEN, "POST", "200")] += 1
        sent.append(Sent(len(encode("JULIET:")), 7))
        async with client.stream("POST", COMP, json=body([1, 2, 3, 4], 3, stream=True, model=MODEL,
                                                          stream_options={"include_usage": True})) as resp:
            events = await read_sse(resp)
        assert events[-1][1] == "[DONE]" and events[-2][1]["usage"]["completion_tokens"] == 3
        http[(MODEL, COMP, "POST", "200")] += 1
        sent.append(Sent(4, 3))
        r4 = (await post(COMP, body("O Romeo", 4, n=2, model=MODEL), 200)).json()
        assert r4["usage"]["completion_tokens"] == 8
        sent += [Sent(len(encode("O Romeo")), 4)] * 2
        # greedy repeats r1, so stopping on its last token stops where that token first appears
        stop_at = r1["token_ids"].index(r1["token_ids"][-1])
        r5 = (await post(GEN, body("ROMEO:", 5, stop_token_ids=[r1["token_ids"][-1]]), 200)).json()
        assert (r5["finish_reason"], r5["usage"]["completion_tokens"]) == ("stop", stop_at + 1)  # + the stop token
        sent.append(Sent(len(encode("ROMEO:")), stop_at + 1))

        too_long = await post(GEN, body("ROMEO:", 125), 400)
        assert too_long.json()["error"]["code"] == "context_length_exceeded"
        await post(GEN, body("ROMEO:", 5, temperature=-1), 400, model="")  # body invalid: model unknown
        await post(GEN, body("ROMEO:", 5000), 400)  # over max_tokens_limit, after the model was chosen
        await post(GEN, body("ROMEO:", 5, model="nope"), 404, model="")

        # One slot: A1 runs, A2 and B wait (the queue is full: C is refused), B's client leaves before B starts.
        async with client.stream("POST", GEN, json=body("ROMEO:", 120, stream=True)) as a1:
            lines = a1.aiter_lines()
            while not (await anext(lines)).startswith("data:"):
                pass
            a2 = asyncio.create_task(post(GEN, body("JULIET:", 120), 200))
            await scrape.wait_for("attnserve_requests_waiting", {"model": MODEL}, 1)
            async with client.stream("POST", GEN, json=body("B", 10, stream=True)) as b:
                assert b.status_code == 200
                await scrape.wait_for("attnserve_requests_waiting", {"model": MODEL}, 2)
                await post(GEN, body("ROMEO:", 5), 429)
            await scrape.wait_for("attnserve_requests_finished_total", {"model": MODEL, "finish_reason": "abort"}, 1)
            assert not a2.done(), "A1 and A2 finished before B's abort: B may have been scheduled"
            async for _ in lines:
                pass
        await a2
        http[(MODEL, GEN, "POST", "200")] += 2
        sent += [Sent(len(encode("ROMEO:")), 120), Sent(len(encode("JULIET:")), 120),
                 Sent(len(encode("B")), 0, scheduled=False)]
        await scrape.wait_for("attnserve_requests_running", {"model": MODEL}, 0)
        return sent, http, scrape.scrapes


def test_metrics_after_a_known_load(make_server: Callable[..., Any]) -> None:
    # every prompt computed; module calls for each step (--enforce-eager): the one-slot part below needs A1's 120
    # tokens to outlast a few client round trips, which the fused step's ~0.1 ms tiny-model steps did not always
    server = make_server(max_num_seqs=1, max_waiting_requests=2, enable_prefix_caching=False, enforce_eager=True)
    encode = server.models[MODEL].tokenizer.encode
    sent, http, scrapes = asyncio.run(drive_load(server.url, encode))
    m = asyncio.run(_final_scrape(server.url))

    produced = [s for s in sent if s.output_tokens >= 1]
    scheduled = [s for s in sent if s.scheduled]
    steps = sum(s.steps for s in sent)
    assert len(sent) == 9 and len(scheduled) == 8

    # counters: exact values, and no series beyond the expected ones
    assert at(m, "attnserve_generation_tokens_total") == sum(s.output_tokens for s in sent)
    assert at(m, "attnserve_prompt_tokens_total") == sum(s.prompt_tokens for s in sent)
    assert {dict(k)["finish_reason"]: v for k, v in series(m, "attnserve_requests_finished_total").items()} == {
        "length": 7, "stop": 1, "abort": 1, "error": 0}
    assert at(m, "attnserve_preemptions_total") == 0
    assert {(dict(k)["model"], dict(k)["reason"]): v for k, v in series(m, "attnserve_requests_rejected_total").items()
            } == {(MODEL, "overload"): 1, (MODEL, "too_long"): 1, (MODEL, "invalid"): 1, ("", "invalid"): 2}
    http[("", METRICS, "GET", "200")] += scrapes
    assert {(d["model"], d["route"], d["method"], d["status"]): v for d, v in
            ((dict(k), v) for k, v in m["attnserve_http_requests_total"].items())} == dict(http)

    # histograms: count = the requests (or steps) each one describes; sums where they are exact
    count = lambda name: at(m, f"attnserve_{name}_count")  # noqa: E731
    for name in ("e2e_request_latency_seconds", "request_prompt_tokens", "request_generation_tokens"):
        assert count(name) == len(sent), name
    for name in ("request_queue_time_seconds", "request_inference_time_seconds", "prefill_step_time_seconds"):
        assert count(name) == len(scheduled), name
    for name in ("time_to_first_token_seconds", "request_prefill_time_seconds", "request_decode_time_seconds"):
        assert count(name) == len(produced), name
    assert count("request_time_per_output_token_seconds") == sum(s.output_tokens >= 2 for s in sent)
    assert count("inter_token_latency_seconds") == sum(s.output_tokens - 1 for s in produced)
    assert count("decode_step_time_seconds") == steps - len(scheduled)
    assert count("step_time_seconds") == count("batch_size") == at(m, "attnserve_batch_size_sum") == steps
    assert count("iteration_tokens") == steps
    assert at(m, "attnserve_iteration_tokens_sum") == sum(s.prompt_tokens for s in scheduled) + steps - len(scheduled)
    assert at(m, "attnserve_prefix_cache_queries_total") == at(m, "attnserve_prefix_cache_hits_total") == 0
    assert at(m, "attnserve_request_prompt_tokens_sum") == at(m, "attnserve_prompt_tokens_total")
    assert at(m, "attnserve_request_generation_tokens_sum") == at(m, "attnserve_generation_tokens_total")
    assert at(m, "attnserve_inter_token_latency_seconds_sum") == pytest.approx(
        at(m, "attnserve_request_decode_time_seconds_sum"))
    assert at(m, "attnserve_request_generation_tokens_bucket", le="+Inf") == len(sent)
    assert at(m, "attnserve_request_generation_tokens_bucket", le="1.0") == sum(s.output_tokens <= 1 for s in sent)

    # gauges once idle, info, and the model that got no traffic stays at zero
    assert at(m, "attnserve_requests_running") == at(m, "attnserve_requests_waiting") == 0
    assert at(m, "attnserve_kv_blocks_free") == at(m, "attnserve_kv_blocks") == 256
    assert at(m, "attnserve_kv_cache_usage_ratio") == 0 and at(m, "attnserve_engine_up") == 1
    info = next(dict(k) for k in m["attnserve_model_info"] if dict(k)["model"] == MODEL)
    described = server.models[MODEL].describe()
    assert info == {"model": MODEL, **{k: str(described[k]) for k in (
        "architecture", "parameters", "dtype", "device", "context_length", "block_size", "heads", "kv_heads",
        "kv_bytes_per_token")}}
    assert info["dtype"] == "float32" and info["device"] == "cpu"
    build = dict(next(iter(m["attnserve_build_info"])))
    assert (build["version"], build["torch_version"]) == (__version__, torch.__version__)
    assert m["attnserve_generation_tokens_total"][frozenset({"model": "tiny-mt"}.items())] == 0


async def _final_scrape(url: str) -> dict[str, dict[Labels, float]]:
    async with httpx.AsyncClient(base_url=url) as client:
        return await Scraper(client)()


def test_preemption_is_counted_and_tokens_stay_exact(make_server: Callable[..., Any]) -> None:
    """Two greedy choices share 8 blocks of 4 tokens; each needs 7 to finish, so the newer is preempted once and
    recomputed after the older finishes. Output tokens are unchanged; its prompt is prefilled twice (without
    prefix caching, which would share the prompt's block and change the arithmetic)."""
    server = make_server(kv_cache_blocks=8, block_size=4, enable_prefix_caching=False)
    r = httpx.post(f"{server.url}{COMP}", json=body("ROMEO:", 20, n=2, model=MODEL), timeout=60)
    assert r.status_code == 200, r.text
    texts = [c["text"] for c in r.json()["choices"]]
    assert texts[0] == texts[1]
    m = asyncio.run(_final_scrape(server.url))
    assert at(m, "attnserve_preemptions_total") == 1
    assert at(m, "attnserve_generation_tokens_total") == 40
    assert at(m, "attnserve_prefill_step_time_seconds_count") >= 2
    assert at(m, "attnserve_kv_blocks_free") == 8 and at(m, "attnserve_kv_cache_usage_ratio") == 0


def test_exposition_is_clean(make_server: Callable[..., Any]) -> None:
    """One prefix, help on every family, a model label on every engine series, no `_created` twins."""
    server = make_server()
    text = httpx.get(f"{server.url}{METRICS}").text
    families = list(text_string_to_metric_families(text))
    assert families and all(f.name.startswith("attnserve_") and f.documentation for f in families)
    assert "_created" not in text
    for f in families:
        for s in f.samples:
            assert s.name == "attnserve_build_info" or "model" in s.labels, s
    names = {f.name for f in families}
    for expected in ("attnserve_requests_running", "attnserve_kv_cache_usage_ratio", "attnserve_time_to_first_token_"
                     "seconds", "attnserve_inter_token_latency_seconds", "attnserve_request_queue_time_seconds"):
        assert expected in names


def test_a_translators_prompt_tokens_agree_across_usage_metrics_and_the_access_log(make_server: Callable[..., Any]) -> None:
    """One count (Request.num_prompt_tokens): a translator's prompt is its source, not its decoder's BOS."""
    server = make_server()
    name = next(n for n, m in server.models.items() if m.is_encoder_decoder)
    r = httpx.post(f"{server.url}/v1/generate", json={"model": name, "prompt": "Two dogs play in the snow.",
                                                      "max_tokens": 3, "ignore_eos": True}, timeout=30)
    usage = r.json()["usage"]
    assert usage["prompt_tokens"] == len(server.models[name].tokenizer.encode("Two dogs play in the snow.")) > 1

    async def scrape() -> dict[str, dict[Labels, float]]:
        async with httpx.AsyncClient(base_url=server.url) as c:
            return await Scraper(c)()

    m = asyncio.run(scrape())
    assert m["attnserve_prompt_tokens_total"][frozenset({"model": name}.items())] == usage["prompt_tokens"]


def test_prefix_cache_counters_count_the_tokens_reused(make_server: Callable[..., Any]) -> None:
    """The same prompt twice, one after the other: the second reuses every token but its last (whose logits it
    needs), the first none; afterwards no block is shared."""
    server = make_server(block_size=4)
    prompt = "ROMEO: But soft, what light"
    for _ in range(2):
        r = httpx.post(f"{server.url}{COMP}", json=body(prompt, 3, model=MODEL), timeout=60)
        assert r.status_code == 200, r.text
    n = r.json()["usage"]["prompt_tokens"]
    m = asyncio.run(_final_scrape(server.url))
    assert at(m, "attnserve_prefix_cache_queries_total") == 2 * n
    assert at(m, "attnserve_prefix_cache_hits_total") == n - 1
    assert at(m, "attnserve_kv_blocks_shared") == 0

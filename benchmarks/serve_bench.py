"""A vLLM-style serving benchmark: an async, streaming load generator for the native API (/v1/generate, SSE
events `token` and `done`) and the OpenAI one (/v1/completions, `data:` chunks ending with [DONE]).

    python -m benchmarks.serve_bench --url http://127.0.0.1:8000 --model shakespeare-gpt \\
        --input-len 32 --output-len 128 --concurrency 1,8,32 --num-prompts 8,32,64 --out results/

Prompts are random token ids from the model's vocabulary made self-consistent by a /v1/detokenize ->
/v1/tokenize round trip, so one seed gives the same prompts on every server with the same tokenizer; the native
API gets their text, the OpenAI API their ids. Every request sets `ignore_eos`, so it generates exactly
--output-len tokens. Each concurrency level reports what vLLM's benchmark_serving reports: request, output and
total token throughput and the mean / median / p99 of TTFT, TPOT, ITL and end-to-end latency, plus the
server's own decode step time from /metrics when the server exports it."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import random
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
from tqdm import tqdm

from benchmarks.serve_client import (
    STEP_SERIES,
    Api,
    LoadSpec,
    Prompt,
    RequestResult,
    make_prompts,
    scrape,
    send_native,
    send_openai,
)

__all__ = ["Api", "LoadSpec", "Prompt", "RequestResult", "prompts_from", "prompts_wanted", "run_sweep", "summarize"]


def step_stats(before: dict[str, float], after: dict[str, float], summary: dict[str, Any]) -> dict[str, float]:
    """Mean decode step (forward + sampling) and mean whole engine step over one level; the decode batch is
    the output tokens less each request's first (made by its prefill) per decode step."""

    def delta(series: str, part: str) -> float:
        return after.get(f"{series}_{part}", 0.0) - before.get(f"{series}_{part}", 0.0)

    decode, _, step = STEP_SERIES
    steps = delta(decode, "count")
    if steps <= 0:
        return {}
    out = {"decode_steps": steps, "decode_step_mean_ms": 1000 * delta(decode, "sum") / steps,
           "mean_decode_batch": (summary["total_output_tokens"] - summary["completed"]) / steps}
    if delta(step, "count") > 0:
        out["step_mean_ms"] = 1000 * delta(step, "sum") / delta(step, "count")
    return out


# --- the numbers ---------------------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile with linear interpolation (numpy's default); 0 for no values."""
    return float(np.percentile(values, q)) if values else 0.0


def summarize(results: list[RequestResult], duration: float) -> dict[str, Any]:
    """vLLM's benchmark_serving metrics; latencies in milliseconds, throughputs per second of wall time."""
    ok = [r for r in results if r.ok]
    inputs, outputs = sum(r.prompt_tokens for r in ok), sum(r.output_tokens for r in ok)
    series = {
        "ttft": [r.ttft for r in ok],
        "tpot": [(r.latency - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1],
        "itl": [x for r in ok for x in r.itls],
        "e2el": [r.latency for r in ok],
    }
    out: dict[str, Any] = {
        "completed": len(ok), "failed": len(results) - len(ok), "duration_s": duration,
        "total_input_tokens": inputs, "total_output_tokens": outputs,
        "request_throughput": len(ok) / duration, "output_throughput": outputs / duration,
        "total_token_throughput": (inputs + outputs) / duration,
        "errors": sorted({r.error for r in results if r.error})[:5],
    }
    for name, values in series.items():
        ms = [1000 * v for v in values]
        out[f"mean_{name}_ms"] = float(np.mean(ms)) if ms else 0.0
        out[f"median_{name}_ms"] = percentile(ms, 50)
        out[f"p90_{name}_ms"] = percentile(ms, 90)
        out[f"p99_{name}_ms"] = percentile(ms, 99)
    return out


# --- running ------------------------------------------------------------------------------------------------

Sender = Callable[[aiohttp.ClientSession, LoadSpec, Prompt, int], Awaitable[RequestResult]]


async def _guarded(send: Sender, client: aiohttp.ClientSession, spec: LoadSpec, prompt: Prompt, seed: int) -> RequestResult:
    for attempt in (1, 2):
        try:
            return await send(client, spec, prompt, seed)
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as e:  # a kept-alive connection the server
            if attempt == 2:  # had just closed: once more, on a fresh one (llama.cpp's HTTP library closes them;
                # seen as "Can not write request body" or a disconnect)
                return RequestResult(prompt_tokens=len(prompt.ids), error=f"{type(e).__name__} (twice): {e}"[:200])
        except Exception as e:  # a failed request is a result to count, never the end of the run
            return RequestResult(prompt_tokens=len(prompt.ids), error=f"{type(e).__name__}: {e}"[:200])
    raise AssertionError("unreachable")


async def run_level(client: aiohttp.ClientSession, spec: LoadSpec, prompts: list[Prompt], concurrency: int,
                    request_rate: float = math.inf, progress: bool = True) -> dict[str, Any]:
    """Send every prompt (Poisson arrivals at request_rate, at most `concurrency` in flight) and summarize."""
    send: Sender = send_native if spec.api == "native" else send_openai
    gate = asyncio.Semaphore(concurrency)
    arrivals = random.Random(spec.seed + 1)
    bar = tqdm(total=len(prompts), desc=f"{spec.model} c={concurrency}", disable=not progress, leave=False)

    async def one(i: int, prompt: Prompt) -> RequestResult:
        async with gate:
            result = await _guarded(send, client, spec, prompt, spec.seed + i)
        bar.update(1)
        return result

    start = time.perf_counter()
    tasks = []
    for i, p in enumerate(prompts):
        tasks.append(asyncio.create_task(one(i, p)))
        if math.isfinite(request_rate):
            await asyncio.sleep(arrivals.expovariate(request_rate))
    results = await asyncio.gather(*tasks)
    duration = time.perf_counter() - start
    bar.close()
    return {"concurrency": concurrency, "num_prompts": len(prompts), "request_rate": request_rate,
            **summarize(list(results), duration)}


async def run_with_long_prompts(client: aiohttp.ClientSession, spec: LoadSpec, prompts: list[Prompt], concurrency: int,
                                long_len: int, interval: float, progress: bool = True) -> dict[str, Any]:
    """The level at `concurrency` while a `long_len`-token prompt arrives every `interval` seconds (each asks for
    one token; they are not in the summary): a long prefill must not stall the streams (chunked prefill)."""
    send: Sender = send_native if spec.api == "native" else send_openai
    long_spec = replace(spec, input_len=long_len, output_len=1, seed=spec.seed + 7)
    # distinct prompts: a repeated one would be served from the prefix cache after its first arrival
    long_prompts = await make_prompts(client, long_spec, 32)
    stop, sent = asyncio.Event(), []  # type: asyncio.Event, list[asyncio.Task[RequestResult]]

    async def arrivals() -> None:
        while not stop.is_set():
            prompt = long_prompts[len(sent) % len(long_prompts)]
            sent.append(asyncio.create_task(_guarded(send, client, long_spec, prompt, 10_000 + len(sent))))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval)

    background = asyncio.create_task(arrivals())
    level = await run_level(client, spec, prompts, concurrency, progress=progress)
    stop.set()
    await background
    long_results = await asyncio.gather(*sent)
    level["long_prompts"] = {"tokens": len(long_prompts[0].ids), "interval_s": interval, "sent": len(sent),
                             "ok": sum(r.ok for r in long_results),
                             "median_ttft_ms": 1000 * statistics.median([r.ttft for r in long_results if r.ok] or [0])}
    return level


def prompts_wanted(concurrencies: list[int], num_prompts: list[int], warmup: int = 1, one_stream_runs: int = 1,
                   long_prompts: bool = False) -> int:
    """How many prompts a sweep sends: every request its own (warm-up and levels too), so that none is served
    from a server's prefix cache."""
    runs = [one_stream_runs if c == 1 else 1 for c in concurrencies]
    return warmup + sum(n * r for n, r in zip(num_prompts, runs, strict=True)) + (num_prompts[-1] if long_prompts else 0)


async def run_sweep(spec: LoadSpec, concurrencies: list[int], num_prompts: list[int],
                    request_rate: float = math.inf, warmup: int = 1, progress: bool = True,
                    long_prompts: tuple[int, float] | None = None,
                    prompts: list[Prompt] | None = None, one_stream_runs: int = 1) -> dict[str, Any]:
    """One level per concurrency (num_prompts[i] requests each), on one connection pool, after a warm-up; with
    `prompts`, those (another server's, whose tokenizer this one shares) instead of prompts made here. The level
    at concurrency 1 runs `one_stream_runs` times on fresh prompts and reports the run of median output
    throughput (a one-stream level lasts about a second, and a shared machine's hiccup moves one run by 2x);
    `runs_output_throughput` lists every run's."""
    headers = {"Authorization": f"Bearer {spec.api_key}"} if spec.api_key else {}
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, headers=headers,
                                     timeout=aiohttp.ClientTimeout(total=spec.timeout)) as client:
        wanted = prompts_wanted(concurrencies, num_prompts, warmup, one_stream_runs, long_prompts is not None)
        if prompts is None:
            prompts = await make_prompts(client, spec, wanted)
        elif len(prompts) < wanted:
            raise ValueError(f"{len(prompts)} prompts given, {wanted} needed")
        prompts = prompts[:wanted]
        for i in range(warmup):
            await _guarded(send_native if spec.api == "native" else send_openai, client,
                           replace(spec, output_len=min(8, spec.output_len)), prompts[i], i)
        levels, at = [], warmup
        for c, n in zip(concurrencies, num_prompts, strict=True):
            runs = []
            for _ in range(one_stream_runs if c == 1 else 1):
                before = await scrape(client, spec)
                level = await run_level(client, spec, prompts[at : at + n], c, request_rate, progress)
                at += n
                level["server"] = step_stats(before, await scrape(client, spec), level)
                runs.append(level)
            level = sorted(runs, key=lambda r: r["output_throughput"])[len(runs) // 2]
            if len(runs) > 1:
                level["runs_output_throughput"] = [r["output_throughput"] for r in runs]
            levels.append(level)
        extra = {}
        if long_prompts is not None:  # the highest level again, with long prompts arriving
            c, n = concurrencies[-1], num_prompts[-1]
            extra["with_long_prompts"] = await run_with_long_prompts(client, spec, prompts[at : at + n], c, *long_prompts,
                                                                     progress=progress)
    return {"spec": {k: v for k, v in asdict(spec).items() if k != "api_key"},
            "mean_prompt_tokens": sum(len(p.ids) for p in prompts) / len(prompts), "levels": levels, **extra}


async def prompts_from(spec: LoadSpec, n: int) -> list[Prompt]:
    """The first n prompts a sweep with this spec sends (the warm-up's first), made by spec.url's tokenizer."""
    headers = {"Authorization": f"Bearer {spec.api_key}"} if spec.api_key else {}
    async with aiohttp.ClientSession(headers=headers, timeout=aiohttp.ClientTimeout(total=spec.timeout)) as client:
        return await make_prompts(client, spec, n)


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.serve_bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--model", required=True)
    p.add_argument("--api", choices=["native", "openai"], default="native")
    p.add_argument("--num-prompts", default="32", help="one count, or one per concurrency level")
    p.add_argument("--input-len", type=int, default=32)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--concurrency", default="1,8,32", help="comma-separated levels")
    p.add_argument("--request-rate", type=float, default=math.inf, help="Poisson arrivals per second (inf: all at once)")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--api-key")
    p.add_argument("--label", default="serve", help="file name stem for --out")
    p.add_argument("--out", type=Path, help="folder for <label>.json, <label>.md and plots")
    a = p.parse_args(argv)
    concurrencies, counts = _ints(a.concurrency), _ints(a.num_prompts)
    counts = counts * len(concurrencies) if len(counts) == 1 else counts
    spec = LoadSpec(a.url.rstrip("/"), a.model, a.api, a.input_len, a.output_len, a.temperature, a.seed,
                    api_key=a.api_key)
    result = asyncio.run(run_sweep(spec, concurrencies, counts, a.request_rate, a.warmup))
    from benchmarks.report import levels_table, plot_levels

    table = levels_table(result["levels"])
    sys.stdout.write(table + "\n")
    if a.out is not None:
        a.out.mkdir(parents=True, exist_ok=True)
        (a.out / f"{a.label}.json").write_text(json.dumps(result, indent=2) + "\n")
        (a.out / f"{a.label}.md").write_text(table + "\n")
        plot_levels({a.label: result["levels"]}, a.out / f"{a.label}.png", title=f"{a.model} ({a.api} API)")


if __name__ == "__main__":
    main()

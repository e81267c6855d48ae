"""Shared-prefix serving: what automatic prefix caching saves when every request starts with the same text.

    python -m benchmarks.prefix_bench                             # shakespeare-gpt and SmolLM2, float32, CPU
    python -m benchmarks.prefix_bench --models shakespeare-gpt    # the small model only, about a minute

The scenario: --requests requests (default 128), at most --streams (32) in flight, each prompt one common
--prefix-len-token prefix (200) followed by --own-len tokens of its own (32, different in every request), each
generating exactly --output-len tokens (32; greedy, ignore_eos). The same model is served twice, one server at a
time: our server as it starts by default (prefix caching on) and with --no-enable-prefix-caching. Both get the
same load in the same way: one warm-up request whose prompt shares nothing with the scenario's, then every
request. Prompts are token ids sent to the OpenAI API (/v1/completions accepts a list of ints), so the prefix is
the same tokens in every request whatever the tokenizer; they are random ids from the vocabulary without its
special tokens, seeded, identical on both servers. A model whose context cannot hold prefix + own + output gets
the longest prefix that fits, and the results say so.

Per server: TTFT median and p90, output and request throughput, mean end-to-end latency, the server's prefill
time from /metrics, and the attnserve_prefix_cache_{queries,hits}_total deltas (tokens; hit rate = hits /
queries) when the server exports them. Writes prefix-<model>-<dtype>.json, .md (with / without / ratio) and .png
to benchmarks/results/<date>-<device>/ (or --out)."""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import logging
import random
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from benchmarks.checkpoints import make_model
from benchmarks.report import markdown_table
from benchmarks.run_cpu import RESULTS, Plan, free_port, our_server, running
from benchmarks.serve_bench import _guarded, run_level
from benchmarks.serve_client import STEP_SERIES, LoadSpec, Prompt, send_openai

log = logging.getLogger("benchmarks")
FLAG = "--no-enable-prefix-caching"
QUERIES, HITS = "attnserve_prefix_cache_queries_total", "attnserve_prefix_cache_hits_total"
PREFILL = STEP_SERIES[1]
SIDES = ("with_caching", "without_caching")
ROWS = (("TTFT median ms", "median_ttft_ms"), ("TTFT p90 ms", "p90_ttft_ms"),
        ("output tok/s", "output_throughput"), ("requests/s", "request_throughput"),
        ("mean E2E ms", "mean_e2el_ms"), ("server prefill s", "prefill_s"),
        ("prefix-cache queries (tokens)", "prefix_cache_queries"), ("prefix-cache hits (tokens)", "prefix_cache_hits"),
        ("prefix-cache hit rate", "prefix_cache_hit_rate"), ("completed", "completed"), ("failed", "failed"))


@dataclass(frozen=True)
class Scenario:
    streams: int = 32
    prefix_len: int = 200
    own_len: int = 32
    output_len: int = 32
    requests: int = 128
    device: str = "cpu"
    threads: int | None = None
    seed: int = 0


@dataclass(frozen=True)
class Prompts:
    requests: list[Prompt]
    warmup: Prompt
    prefix_len: int


def caching_flag_supported() -> bool:
    """Whether this checkout's server knows --no-enable-prefix-caching."""
    done = subprocess.run([sys.executable, "-m", "service", "--help"], capture_output=True, text=True)
    return FLAG in done.stdout


async def make_prompts(client: aiohttp.ClientSession, url: str, model: str, sc: Scenario) -> Prompts:
    """The scenario's prompts from the served tokenizer's vocabulary (its special tokens left out)."""
    async with client.get(f"{url}/tokenizer_info", params={"model": model}) as resp:
        resp.raise_for_status()
        info = await resp.json()
    special = {info.get(f"{k}_token_id") for k in ("bos", "eos", "pad", "unk")}
    pool = [i for i in range(int(info["vocab_size"])) if i not in special]
    prefix_len = min(sc.prefix_len, int(info["model_max_length"]) - sc.own_len - sc.output_len)
    if prefix_len <= 0:
        raise ValueError(f"{model}: a context of {info['model_max_length']} tokens leaves no room for a prefix")
    rng = random.Random(sc.seed)
    draw = lambda n: [rng.choice(pool) for _ in range(n)]  # noqa: E731
    prefix = draw(prefix_len)
    requests = [Prompt("", prefix + draw(sc.own_len)) for _ in range(sc.requests)]
    return Prompts(requests, Prompt("", draw(prefix_len + sc.own_len)), prefix_len)


async def counters(client: aiohttp.ClientSession, url: str, model: str) -> dict[str, float]:
    """The prefix-cache counters and the prefill step-time sum and count for this model from /metrics."""
    wanted = {QUERIES, HITS, f"{PREFILL}_sum", f"{PREFILL}_count"}
    async with client.get(f"{url}/metrics") as resp:
        if resp.status != 200:
            return {}
        text = await resp.text()
    return {s.name: s.value for family in text_string_to_metric_families(text) for s in family.samples
            if s.name in wanted and s.labels.get("model") == model}


def server_stats(before: dict[str, float], after: dict[str, float]) -> dict[str, Any]:
    delta = lambda name: after.get(name, 0.0) - before.get(name, 0.0)  # noqa: E731
    out: dict[str, Any] = {"prefill_s": delta(f"{PREFILL}_sum") if f"{PREFILL}_sum" in after else None,
                           "prefix_cache_queries": None, "prefix_cache_hits": None, "prefix_cache_hit_rate": None}
    if QUERIES in after and HITS in after:
        queries, hits = delta(QUERIES), delta(HITS)
        out.update(prefix_cache_queries=queries, prefix_cache_hits=hits,
                   prefix_cache_hit_rate=hits / queries if queries else 0.0)
    return out


async def load(url: str, model: str, sc: Scenario, prompts: Prompts | None,
               progress: bool) -> tuple[dict[str, Any], Prompts]:
    """The warm-up request, then every request with at most sc.streams in flight; the summary and the prompts."""
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout) as client:
        prompts = prompts or await make_prompts(client, url, model, sc)
        spec = LoadSpec(url, model, "openai", len(prompts.requests[0].ids), sc.output_len, seed=sc.seed)
        await _guarded(send_openai, client, replace(spec, output_len=min(8, sc.output_len)), prompts.warmup, 0)
        before = await counters(client, url, model)
        summary = await run_level(client, spec, prompts.requests, sc.streams, progress=progress)
        after = await counters(client, url, model)
    return {**summary, **server_stats(before, after)}, prompts


def run_model(sc: Scenario, checkpoint: Path, dtype: str, out: Path, flag: bool, progress: bool) -> dict[str, Any]:
    """The scenario on our server with prefix caching, then without, one server at a time."""
    name = checkpoint.stem if checkpoint.is_file() else checkpoint.name  # a GGUF file is served by its stem
    plan = Plan(models=(name,), dtypes=(dtype,), device=sc.device, input_len=sc.prefix_len + sc.own_len,
                output_len=sc.output_len, concurrency=(sc.streams,), threads=sc.threads)
    res: dict[str, Any] = {"model": name, "dtype": dtype, "scenario": asdict(sc), "prefix_caching_flag": flag}
    prompts = None
    for side in SIDES:
        port, t = free_port(), time.monotonic()
        cmd = our_server(plan, checkpoint, dtype, port) + ([FLAG] if flag and side == "without_caching" else [])
        with running(cmd, port, out / "logs" / f"prefix-{side}-{name}-{dtype}.log") as url:
            res[side], prompts = asyncio.run(load(url, name, sc, prompts, progress))
        log.info("%s %s %s: %.0f s", name, dtype, side.replace("_", " "), time.monotonic() - t)
    assert prompts is not None
    res["prefix_len"] = prompts.prefix_len
    with_, without = res["with_caching"], res["without_caching"]
    res["ratio"] = {key: with_[key] / without[key] for _, key in ROWS[:6]
                    if with_.get(key) is not None and without.get(key)}
    return res


def _cell(value: Any) -> Any:
    return "-" if value is None else value


def table(res: dict[str, Any]) -> str:
    sc, w, wo = res["scenario"], res["with_caching"], res["without_caching"]
    head = (f"## Shared prefix: {res['model']} {res['dtype']}\n\n{sc['requests']} requests, {sc['streams']} "
            f"streams, prompt = {res['prefix_len']}-token common prefix + {sc['own_len']} own tokens, "
            f"{sc['output_len']} output tokens (greedy, ignore_eos), {sc['device']}.\n")
    notes = []
    if res["prefix_len"] < sc["prefix_len"]:
        notes.append(f"The prefix was cut from {sc['prefix_len']} to {res['prefix_len']} tokens to fit the "
                     "model's context.")
    if not res["prefix_caching_flag"]:
        notes.append(f"This server has no `{FLAG}` flag: both columns ran the same server command.")
    ratio = lambda key: f"{res['ratio'][key]:.2f}x" if key in res["ratio"] else "-"  # noqa: E731
    rows = [[label, _cell(w.get(key)), _cell(wo.get(key)), ratio(key)] for label, key in ROWS]
    body = markdown_table(["metric", "with prefix caching", f"without ({FLAG})", "ratio (with / without)"], rows)
    return "\n".join([head, body, *(["", " ".join(notes)] if notes else [])]) + "\n"


def plot(res: dict[str, Any], path: Path) -> None:
    """TTFT median and output throughput, with and without prefix caching, side by side."""
    from benchmarks.report import plt  # pyplot on the Agg backend

    sc = res["scenario"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.5))
    panels = (("median_ttft_ms", "TTFT median (ms)", "time to first token (lower is better)"),
              ("output_throughput", "output tokens / s", "output throughput (higher is better)"))
    for ax, (key, ylabel, title) in zip(axes, panels, strict=True):
        bars = ax.bar(["with prefix caching", "without"], [res[s][key] for s in SIDES], color=["C0", "C1"])
        ax.bar_label(bars, fmt="%.1f")
        ax.set(ylabel=ylabel, title=title)
    fig.suptitle(f"{res['model']} {res['dtype']}: {sc['requests']} requests, {sc['streams']} streams, "
                 f"{res['prefix_len']}-token shared prefix + {sc['own_len']} own, {sc['output_len']} out")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def checkpoint_for(model: str, work_dir: Path) -> Path:
    """A checkpoint folder given as a path, or a benchmark model made by benchmarks.checkpoints."""
    path = Path(model)
    return path if (path / "config.json").is_file() else make_model(model, work_dir)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.prefix_bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="shakespeare-gpt,smollm2-135m",
                   help="benchmark model names (shakespeare-gpt, gpt2-small, smollm2-135m) or checkpoint folders")
    p.add_argument("--dtypes", default="float32")
    p.add_argument("--streams", type=int, default=32)
    p.add_argument("--prefix-len", type=int, default=200)
    p.add_argument("--own-len", type=int, default=32)
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--requests", type=int, default=128)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work-dir", type=Path, default=Path.home() / ".cache" / "attnserve-bench",
                   help="where random-weight checkpoints are made (once)")
    p.add_argument("--out", type=Path, help="results folder (default: benchmarks/results/<date>-<device>)")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", stream=sys.stderr)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    sc = Scenario(a.streams, a.prefix_len, a.own_len, a.output_len, a.requests, a.device, a.threads, a.seed)
    out = a.out or RESULTS / f"{datetime.date.today().isoformat()}-{a.device}"
    out.mkdir(parents=True, exist_ok=True)
    flag = caching_flag_supported()
    if not flag:
        log.warning("the server has no %s flag: both runs use the same server command", FLAG)
    for model in a.models.split(","):
        checkpoint = checkpoint_for(model, a.work_dir)
        for dtype in a.dtypes.split(","):
            res = run_model(sc, checkpoint, dtype, out, flag, sys.stderr.isatty())
            stem = f"prefix-{res['model']}-{dtype}"
            (out / f"{stem}.json").write_text(json.dumps(res, indent=2) + "\n")
            (out / f"{stem}.md").write_text(table(res))
            plot(res, out / f"{stem}.png")
            sys.stdout.write(table(res) + "\n")
    log.info("wrote %s", out)


if __name__ == "__main__":
    main()

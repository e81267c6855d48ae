"""Soak: our server under a steady streaming load for minutes; does its memory stay flat?

    python -m benchmarks.soak                                  # SmolLM2-135M, float32, 10 minutes, 32 streams
    python -m benchmarks.soak --model shakespeare-gpt --minutes 2

Requests of random lengths (prompt 16-400 tokens, output 16-256, greedy, ignore_eos) keep --streams in flight
for --minutes. Every --every seconds: the server's resident memory (RSS, from /proc, summed over the server
process and its children: the engine core process holds the weights and the KV pool) and, from /metrics, the KV
blocks in use and the requests running. KV memory in use should follow the tokens held (it rises and falls with
the load; the pool is allocated lazily) and RSS should stay flat once the server has served its first few
requests: the report gives RSS after a 2-minute warm-up, at the end, and the largest, and a plot. Failed requests
are counted by their error.
Writes soak-<model>-<dtype>.{json,md,png} to benchmarks/results/<date>-<device>/ (or --out)."""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import psutil
from prometheus_client.parser import text_string_to_metric_families
from tqdm import tqdm

from benchmarks.checkpoints import make_model
from benchmarks.plan import Plan, our_server
from benchmarks.run_cpu import RESULTS, free_port, running
from benchmarks.serve_client import LoadSpec, Prompt, send_openai

WARM_S = 120  # the pool's pages are touched as KV use first reaches its peak: RSS is judged after this
GAUGES = ("attnserve_kv_blocks", "attnserve_kv_blocks_free", "attnserve_requests_running")


async def sample(client: aiohttp.ClientSession, spec: LoadSpec, pid: int, t0: float) -> dict[str, float]:
    """RSS of the server's processes (the frontend, the engine core and any other frontends; the largest of them
    alone too) and its KV / running gauges for this model, now."""
    async with client.get(f"{spec.url}/metrics") as resp:
        text = await resp.text()
    m = {s.name: s.value for fam in text_string_to_metric_families(text) for s in fam.samples
         if s.name in GAUGES and s.labels.get("model") == spec.model}
    server = psutil.Process(pid)
    each = [p.memory_info().rss for p in (server, *server.children(recursive=True))]
    return {"t": time.monotonic() - t0, "rss_mib": sum(each) / 2**20, "largest_rss_mib": max(each) / 2**20,
            "processes": len(each),
            "kv_blocks_used": m.get(GAUGES[0], 0.0) - m.get(GAUGES[1], 0.0), "running": m.get(GAUGES[2], 0.0)}


async def soak(spec: LoadSpec, pid: int, streams: int, minutes: float, every: float, seed: int) -> dict[str, Any]:
    rng = random.Random(seed)
    samples: list[dict[str, float]] = []
    done = failed = 0
    errors: dict[str, int] = {}
    stop = time.monotonic() + 60 * minutes
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=spec.timeout)) as client:
        async with client.get(f"{spec.url}/v1/models/{spec.model}") as resp:
            details = (await resp.json())["details"]
        vocab, context = int(details["vocab_size"]), int(details["context_length"])

        async def worker(i: int) -> None:
            nonlocal done, failed
            while time.monotonic() < stop:
                n = rng.randint(16, min(400, context // 2))  # prompt + output always fit the context
                ids = [rng.randrange(min(100, vocab // 2), vocab) for _ in range(n)]  # past the special ids
                one = LoadSpec(spec.url, spec.model, "openai", n, rng.randint(16, min(256, context - n)))
                r = await send_openai(client, one, Prompt("", ids), seed + i)
                done, failed = done + r.ok, failed + (not r.ok)
                if not r.ok:
                    errors[r.error[:80]] = errors.get(r.error[:80], 0) + 1

        t0 = time.monotonic()
        tasks = [asyncio.create_task(worker(i)) for i in range(streams)]
        with tqdm(total=int(60 * minutes), unit="s", desc="soak", disable=not sys.stderr.isatty()) as bar:
            while time.monotonic() < stop:
                await asyncio.sleep(every)
                samples.append(await sample(client, spec, pid, t0))
                bar.update(int(every))
        await asyncio.gather(*tasks)
        samples.append(await sample(client, spec, pid, t0))
    return {"samples": samples, "requests": done, "failed": failed, "errors": errors}


def summary(res: dict[str, Any]) -> dict[str, float]:
    s = res["samples"]
    warm = [x["rss_mib"] for x in s if x["t"] >= WARM_S] or [s[-1]["rss_mib"]]
    return {"rss_after_warm_up_mib": warm[0], "rss_end_mib": s[-1]["rss_mib"],
            "rss_max_mib": max(x["rss_mib"] for x in s), "growth_after_warm_up_mib": s[-1]["rss_mib"] - warm[0],
            "processes_at_end": s[-1]["processes"],
            "kv_blocks_used_max": max(x["kv_blocks_used"] for x in s), "requests": res["requests"],
            "failed": res["failed"]}


def plot(res: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = res["samples"]
    t = [x["t"] / 60 for x in s]
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.plot(t, [x["rss_mib"] for x in s], label="server RSS, all its processes (MiB)")
    ax.set_xlabel("minutes")
    ax.set_ylabel("MiB")
    kv = ax.twinx()
    kv.plot(t, [x["kv_blocks_used"] for x in s], color="tab:orange", label="KV blocks in use")
    kv.set_ylabel("KV blocks in use")
    fig.legend(loc="upper left")
    ax.set_title(f"soak: {res['model']} {res['dtype']}, {res['streams']} streams")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.soak", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--streams", type=int, default=32)
    p.add_argument("--every", type=float, default=10.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work-dir", type=Path, default=Path.home() / ".cache" / "attnserve-bench")
    p.add_argument("--out", type=Path)
    a = p.parse_args(argv)
    checkpoint = make_model(a.model, a.work_dir)
    plan = Plan(models=(a.model,), dtypes=(a.dtype,), input_len=400, output_len=256, concurrency=(a.streams,))
    out = a.out or RESULTS / f"{datetime.date.today().isoformat()}-cpu"
    port = free_port()
    cmd = our_server(plan, checkpoint, a.dtype, port)
    with running(cmd, port, out / "logs" / f"soak-{a.model}-{a.dtype}.log") as url:
        pid = next(c.pid for c in psutil.Process().children() if str(port) in " ".join(c.cmdline()))
        spec = LoadSpec(url, checkpoint.stem if checkpoint.is_file() else checkpoint.name, "openai")
        res = asyncio.run(soak(spec, pid, a.streams, a.minutes, a.every, a.seed))
    res |= {"model": a.model, "dtype": a.dtype, "streams": a.streams, "minutes": a.minutes}
    res["summary"] = summary(res)
    stem = out / f"soak-{a.model}-{a.dtype}"
    stem.with_suffix(".json").write_text(json.dumps(res, indent=2) + "\n")
    rows = "\n".join(f"| {k} | {v:.1f} |" for k, v in res["summary"].items())
    errors = "".join(f"\n- {n} x {e}" for e, n in res["errors"].items())
    stem.with_suffix(".md").write_text(f"| soak {a.model} {a.dtype} | |\n|---|---|\n{rows}\n{errors}\n")
    plot(res, stem.with_suffix(".png"))
    print(stem.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()

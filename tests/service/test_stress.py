"""Stress and soak on loopback against the real process: 5,000 requests in bursts several times what the server
holds, streamed and not, with clients that leave mid-stream and requests that are invalid. Nothing gets a 5xx,
every accepted request ends with a clean finish_reason, refusals are 429 + Retry-After, the KV pool is whole
again at the end and the server's resident memory has not grown."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil
import pytest

ROOT = Path(__file__).resolve().parents[2]
TOTAL = 5000
WARMUP = 500
BURST = 96  # concurrent clients; the server holds 16 running + 16 waiting
SERVER_ENV = {"ATTNSERVE_MAX_NUM_SEQS": "16", "ATTNSERVE_MAX_WAITING_REQUESTS": "16", "ATTNSERVE_MAX_TOKENS_LIMIT": "4",
              "ATTNSERVE_BLOCK_SIZE": "4", "ATTNSERVE_KV_CACHE_BLOCKS": "256", "ATTNSERVE_LOG_LEVEL": "warning"}


@dataclass
class Tally:
    outcomes: Counter[str] = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)  # seconds, accepted requests that ran to the end
    problems: list[str] = field(default_factory=list)


def _plan(i: int, rng: random.Random) -> tuple[str, str, dict[str, object]]:
    """(kind, path, body) of request i: ~5% invalid, ~10% leave mid-stream, the rest split stream/plain."""
    path = "/v1/generate" if i % 2 else "/v1/completions"
    body: dict[str, object] = {"prompt": rng.choice(["ROMEO:", "JULIET: O", "Two dogs", ""]) or "a",
                               "max_tokens": rng.randint(1, 4), "temperature": rng.choice([0, 0.8])}
    roll = rng.random()
    if roll < 0.05:
        return "invalid", path, {**body, "max_tokens": rng.choice([0, 5, "x"])}
    if roll < 0.15:
        return "leave", path, {**body, "max_tokens": 4, "ignore_eos": True, "stream": True}
    return ("stream" if roll < 0.55 else "plain"), path, {**body, "stream": roll < 0.55}


def _finish_reason(path: str, lines: list[str]) -> str | None:
    for line in lines:
        if not line.startswith("data: {"):
            continue
        data = json.loads(line[6:])
        if "error" in data:
            return "error"
        if path == "/v1/generate" and "finish_reason" in data:
            return str(data["finish_reason"])
        for choice in data.get("choices", []):
            if choice.get("finish_reason"):
                return str(choice["finish_reason"])
    return None


async def _one(c: httpx.AsyncClient, kind: str, path: str, body: dict[str, object], tally: Tally) -> None:
    try:
        await _exchange(c, kind, path, body, tally)
    except httpx.TransportError as e:
        tally.problems.append(f"{kind} {path}: {type(e).__name__} {e}")


async def _exchange(c: httpx.AsyncClient, kind: str, path: str, body: dict[str, object], tally: Tally) -> None:
    start = time.monotonic()
    if kind in ("stream", "leave"):
        async with c.stream("POST", path, json=body) as r:
            if r.status_code == 200 and kind == "leave":
                async for line in r.aiter_lines():
                    if line.startswith("data: {"):
                        break  # one token in, then the client goes away (the connection is closed)
                tally.outcomes["left"] += 1
                return
            lines = [line async for line in r.aiter_lines() if line]
    else:
        r = await c.post(path, json=body)
        lines = []
    status = r.status_code
    if status == 429:
        if int(r.headers.get("Retry-After", "0")) < 1:
            tally.problems.append(f"429 without Retry-After: {r.headers}")
        tally.outcomes["429"] += 1
    elif kind == "invalid":
        tally.outcomes[str(status)] += 1
        if status != 400:
            tally.problems.append(f"invalid request got {status}")
    elif status != 200:
        tally.problems.append(f"{kind} {path} got {status}: {r.text[:200] if not lines else lines[:3]}")
    else:
        if kind == "stream":
            reason = _finish_reason(path, lines)
            complete = lines[-1:] == ["data: [DONE]"] or path == "/v1/generate"
        else:
            data = r.json()
            reason = data["finish_reason"] if path == "/v1/generate" else data["choices"][0]["finish_reason"]
            complete = True
        if reason not in ("length", "stop") or not complete:
            tally.problems.append(f"{kind} {path} ended with {reason!r}, complete={complete}")
        tally.outcomes[f"ok-{kind}"] += 1
        tally.latencies.append(time.monotonic() - start)


async def _bursts(url: str, plans: list[tuple[str, str, dict[str, object]]], tally: Tally) -> None:
    # idle connections expire before uvicorn's 5 s keep-alive does, so none is reused as the server closes it
    limits = httpx.Limits(max_connections=BURST, max_keepalive_connections=BURST, keepalive_expiry=2.0)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as c:
        for lo in range(0, len(plans), BURST):
            await asyncio.gather(*(_one(c, *p, tally) for p in plans[lo:lo + BURST]))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _metric(text: str, name: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name + "{") and 'model="tiny-gpt"' in line)


@pytest.mark.slow
def test_5000_requests_in_bursts_leave_no_5xx_no_leak(checkpoints_dir: Path, tmp_path: Path) -> None:
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log = (tmp_path / "server.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "service", "--no-default-models", "--model", str(checkpoints_dir / "tiny-gpt"),
         "--port", str(port), "--dtype", "float32", "--device", "cpu"],
        cwd=ROOT, env={**os.environ, **SERVER_ENV}, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "server.log").read_text()
            try:
                if httpx.get(f"{url}/ready").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        rng = random.Random(0)
        plans = [_plan(i, rng) for i in range(TOTAL)]
        tally = Tally()
        started = time.monotonic()
        asyncio.run(_bursts(url, plans[:WARMUP], tally))
        rss_warm = psutil.Process(proc.pid).memory_info().rss
        asyncio.run(_bursts(url, plans[WARMUP:], tally))
        elapsed = time.monotonic() - started
        time.sleep(0.5)  # the last aborts land within a step
        rss_end = psutil.Process(proc.pid).memory_info().rss
        metrics = httpx.get(f"{url}/metrics").text
        free, total = _metric(metrics, "attnserve_kv_blocks_free"), _metric(metrics, "attnserve_kv_blocks")
        http = [line for line in metrics.splitlines() if line.startswith("attnserve_http_requests_total{")]
        http_all = sum(float(line.rsplit(" ", 1)[1]) for line in http)
        http_5xx = sum(float(line.rsplit(" ", 1)[1]) for line in http if 'status="5' in line)
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    lat = sorted(tally.latencies)
    summary = {"requests": TOTAL, "seconds": round(elapsed, 1), "outcomes": dict(tally.outcomes),
               "p50_ms": round(lat[len(lat) // 2] * 1000), "p99_ms": round(lat[int(len(lat) * 0.99)] * 1000),
               "rss_mb": [round(rss_warm / 2**20), round(rss_end / 2**20)]}
    print("stress:", json.dumps(summary))
    assert not tally.problems, (tally.problems[:10], summary)
    assert sum(tally.outcomes.values()) == TOTAL
    assert tally.outcomes["429"] > 0 and tally.outcomes["left"] > 300 and tally.outcomes["400"] > 150, summary
    assert http_all >= TOTAL and http_5xx == 0  # as the server counted them
    assert total == 256 and free == total, (free, total)
    assert rss_end <= rss_warm * 1.10, summary
    assert code == 0

"""The real process: `python -m service` drains on SIGTERM (in-flight streams finish, new requests get 503, exit
0), stops at once on a second signal, and refuses to start on a model it must not or cannot load (pickle, corrupt safetensors), saying which."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from pathlib import Path
from typing import Any

import httpx
from support import ServiceProcess


async def _stream(c: httpx.AsyncClient, body: dict[str, Any], started: asyncio.Event,
                  opened: list[int] | None = None) -> tuple[int, str | None]:
    """Tokens received and the finish_reason of the `done` event (None if the stream broke off); `opened` gets
    an entry once the server has taken the request (its 200 came back)."""
    tokens, reason = 0, None
    async with c.stream("POST", "/v1/generate", json={**body, "stream": True}) as r:
        assert r.status_code == 200
        if opened is not None:
            opened.append(1)
        async for line in r.aiter_lines():
            if line.startswith("data: ") and '"token_id"' in line:
                tokens += 1
                started.set()
            elif line.startswith("data: ") and "finish_reason" in line:
                reason = json.loads(line[6:])["finish_reason"]
    return tokens, reason


async def _all_taken(started: asyncio.Event, opened: list[int], n: int) -> None:
    """Until a token has come and the server has taken all n requests (so none arrives after the signal)."""
    await asyncio.wait_for(started.wait(), 60)
    end = time.monotonic() + 60
    while len(opened) < n:
        assert time.monotonic() < end, f"{len(opened)} of {n} streams opened"
        await asyncio.sleep(0.01)


async def _sigterm_during_streams(p: ServiceProcess, n: int, max_tokens: int) -> tuple[list[tuple[int, str | None]], dict]:
    body = {"prompt": "ROMEO:", "max_tokens": max_tokens, "ignore_eos": True, "temperature": 0}
    after: dict[str, Any] = {}
    async with httpx.AsyncClient(base_url=p.url, timeout=120) as c:
        started, opened = asyncio.Event(), []
        streams = [asyncio.create_task(_stream(c, body, started, opened)) for _ in range(n)]
        await _all_taken(started, opened, n)
        p.proc.send_signal(signal.SIGTERM)
        end = time.monotonic() + 10
        while (await c.get("/ready")).status_code == 200:
            assert time.monotonic() < end
            await asyncio.sleep(0.01)
        r = await c.post("/v1/generate", json={"prompt": "late", "max_tokens": 2})
        after = {"status": r.status_code, "code": r.json()["error"]["code"], "health": (await c.get("/health")).status_code}
        results = await asyncio.gather(*streams)
    return results, after


def test_sigterm_lets_in_flight_streams_finish_and_exits_0(checkpoints_dir: Path, tmp_path: Path) -> None:
    # two slots, so the 12 streams run in turns and are still in flight well after the signal
    p = ServiceProcess(checkpoints_dir, tmp_path / "server.log", "--max-num-seqs", "2", "--drain-timeout", "60")
    try:
        results, after = asyncio.run(_sigterm_during_streams(p, 12, 100))
        assert after == {"status": 503, "code": "shutting_down", "health": 200}
        assert results == [(100, "length")] * 12
        assert p.proc.wait(timeout=60) == 0
    finally:
        p.stop()
    out = p.output()
    assert '"msg": "draining"' in out and "Traceback" not in out


# Both tests send 40 x 1000 tokens through one slot of long_model: tens of seconds of work, so the engine cannot
# have finished them all before the client has opened the last stream (it did once with 120 tokens each of a short
# model, on a loaded machine: the engine runs ahead of a slow reader, whose outputs wait in its stream's queue).
def test_streams_past_the_drain_timeout_end_with_abort(tmp_path: Path, long_model: Path) -> None:
    p = ServiceProcess(long_model, tmp_path / "server.log", "--max-num-seqs", "1", "--drain-timeout", "0.3")
    try:
        results, after = asyncio.run(_sigterm_during_streams(p, 40, 1000))
        assert after["status"] == 503
        reasons = [reason for _, reason in results]
        assert "abort" in reasons and set(reasons) <= {"length", "abort"}, (results, p.output()[-3000:])
        assert all(tokens < 1000 for tokens, reason in results if reason == "abort")
        assert p.proc.wait(timeout=60) == 0
    finally:
        p.stop()


def test_a_second_signal_stops_at_once(tmp_path: Path, long_model: Path) -> None:
    """Draining 40 long streams through one slot would take many seconds; the second SIGTERM cuts them and the
    process dies of the signal (exit status 143 in a shell) within a moment."""
    p = ServiceProcess(long_model, tmp_path / "server.log", "--max-num-seqs", "1", "--drain-timeout", "60")
    body = {"prompt": "ROMEO:", "max_tokens": 1000, "ignore_eos": True, "temperature": 0}

    async def run() -> tuple[float, list[Any]]:
        async with httpx.AsyncClient(base_url=p.url, timeout=120) as c:
            started, opened = asyncio.Event(), []
            streams = [asyncio.create_task(_stream(c, body, started, opened)) for _ in range(40)]
            await _all_taken(started, opened, 40)
            p.proc.send_signal(signal.SIGTERM)
            while (await c.get("/ready")).status_code == 200:
                await asyncio.sleep(0.01)
            t0 = time.monotonic()
            p.proc.send_signal(signal.SIGTERM)
            await asyncio.to_thread(p.proc.wait, 30)
            return time.monotonic() - t0, await asyncio.gather(*streams, return_exceptions=True)

    try:
        elapsed, results = asyncio.run(run())
        assert p.proc.returncode == -signal.SIGTERM, p.output()
    finally:
        p.stop()
    assert elapsed < 3.0, elapsed
    unfinished = [r for r in results if isinstance(r, BaseException) or r[1] != "length"]
    assert len(unfinished) > 20, "most streams were still waiting when the second signal came"
    out = p.output()
    assert '"msg": "second signal: stopping now"' in out and "Traceback" not in out


def test_pickled_or_corrupt_weights_are_refused_at_start(checkpoints_dir: Path, tmp_path: Path) -> None:
    good = checkpoints_dir / "tiny-gpt"
    pickled = tmp_path / "pickled" / "tiny-gpt"
    pickled.mkdir(parents=True)
    for name in ("config.json", "tokenizer.json"):
        (pickled / name).write_bytes((good / name).read_bytes())
    marker = tmp_path / "pwned"
    # a pickle that would create a file if anything unpickled it
    (pickled / "pytorch_model.bin").write_bytes(
        b"cos\nsystem\n(S'touch " + str(marker).encode() + b"'\ntR.")
    corrupt = tmp_path / "corrupt" / "tiny-gpt"
    corrupt.mkdir(parents=True)
    for name in ("config.json", "tokenizer.json"):
        (corrupt / name).write_bytes((good / name).read_bytes())
    (corrupt / "model.safetensors").write_bytes((good / "model.safetensors").read_bytes()[:1000])
    procs = [ServiceProcess(d.parent, tmp_path / f"{d.parent.name}.log", wait=False) for d in (pickled, corrupt)]
    try:
        codes = [p.proc.wait(timeout=120) for p in procs]
    finally:
        for p in procs:
            p.stop()
    assert codes == [2, 2]
    for p, words in zip(procs, (["pytorch_model.bin", "pickle"], ["model.safetensors", "corrupt"]), strict=True):
        out = p.output()
        assert "Traceback" not in out, out
        line = next(json.loads(x) for x in out.splitlines() if x.startswith("{") and '"cannot start' in x)
        assert line["level"] == "error" and all(w in line["msg"] for w in words), line
    assert not marker.exists()


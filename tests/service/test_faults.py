"""Faults stay where they start: a request whose logits turn NaN fails alone, a client who leaves frees its KV
blocks within a step, and an engine loop that dies says so on /health. Faults are injected into the live
server's objects (model weights, runner, scheduler), the way a bad weight or a bug would appear."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest
import torch
from support import slow_steps

from service.engine.request import RequestStatus


def _greedy(url: str, prompts: list[str], stream: bool = False) -> list[httpx.Response]:
    async def run() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=60) as c:
            return await asyncio.gather(*(c.post(f"{url}/v1/generate", json={
                "prompt": p, "max_tokens": 6, "temperature": 0, "ignore_eos": True, "stream": stream})
                for p in prompts))

    return asyncio.run(run())


def _wait(cond: Callable[[], bool], timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.01)


def test_nan_logits_fail_one_request_and_nothing_else(make_server: Any) -> None:
    s = make_server(block_size=4)
    served = s.models["tiny-gpt"]
    good = ["ROMEO: But", "JULIET: O", "Two dogs", "A man rides", "It is the east"]
    before = [r.json()["text"] for r in _greedy(s.url, good)]
    poison = served.tokenizer.encode("Z")[0]  # in no good prompt
    assert all("Z" not in p for p in good)

    def bad_row(module: Any, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor:
        return output.masked_fill((inputs[0] == poison)[..., None], float("nan"))  # a NaN embedding row

    served.model.tgt_embed.register_forward_hook(bad_row)  # (the row itself is tied to the output layer)
    for stream in (False, True):
        responses = _greedy(s.url, [good[0], "Zwei", *good[1:]], stream)
        bad = responses.pop(1)
        if stream:
            assert bad.status_code == 200 and "event: error" in bad.text and "NaN" in bad.text
            texts = ["".join(json.loads(line[6:])["text"] for line in r.text.splitlines()
                             if line.startswith("data: {\"token_id\"")) for r in responses]
        else:
            assert bad.status_code == 500 and "NaN" in bad.json()["error"]["message"]
            texts = [r.json()["text"] for r in responses]
        assert texts == before  # same batch, same step, untouched
    # the poisoned K/V went back to the pool with their blocks; later requests reuse them unharmed
    assert [r.json()["text"] for r in _greedy(s.url, good * 4)] == before * 4
    assert served.engine.dead is None and httpx.get(f"{s.url}/health").status_code == 200
    assert served.engine.blocks.num_free == served.engine.blocks.num_blocks


@pytest.mark.parametrize("stream", [True, False])
def test_client_disconnect_aborts_within_a_step_and_frees_blocks(make_server: Any, stream: bool) -> None:
    s = make_server(max_tokens_limit=120)
    served = s.models["tiny-gpt"]
    engine = served.engine
    slow_steps(engine, 0.02)
    body = json.dumps({"prompt": "ROMEO:", "max_tokens": 120, "ignore_eos": True, "stream": stream}).encode()
    sock = socket.create_connection(("127.0.0.1", s.port))
    sock.sendall(b"POST /v1/generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    _wait(lambda: len(engine._live) == 1)
    req = next(iter(engine._live.values())).request
    _wait(lambda: len(req.output_ids) >= 5)
    if stream:
        assert b"event: token" in sock.recv(65536)
    sock.close()
    left_at = len(req.output_ids)
    _wait(lambda: engine.blocks.num_free == engine.blocks.num_blocks, timeout=5)
    assert req.status == RequestStatus.FINISHED_ABORTED
    # the stream notices at its next write, a plain request at its next poll (50 ms): a few 20 ms steps at most
    assert len(req.output_ids) - left_at <= 6, (left_at, len(req.output_ids))
    assert not engine._live
    r = httpx.post(f"{s.url}/v1/generate", json={"prompt": "a", "max_tokens": 2})
    assert r.status_code == 200


def test_a_dead_engine_loop_fails_its_requests_and_health_says_so(make_server: Any) -> None:
    s = make_server(max_tokens_limit=120)
    served = s.models["tiny-gpt"]
    slow_steps(served.engine, 0.01)
    schedule = served.engine.scheduler.schedule

    def broken() -> Any:
        if served.engine.steps >= 3:
            raise RuntimeError("scheduler bug")
        return schedule()

    async def run() -> tuple[httpx.Response, httpx.Response]:
        async with httpx.AsyncClient(base_url=s.url, timeout=60) as c:
            body = {"prompt": "ROMEO:", "max_tokens": 100, "ignore_eos": True}
            plain = asyncio.create_task(c.post("/v1/generate", json=body))
            streamed = asyncio.create_task(c.post("/v1/generate", json={**body, "stream": True}))
            await asyncio.sleep(0.1)
            served.engine.steps = 0
            served.engine.scheduler.schedule = broken
            return await plain, await streamed

    plain, streamed = asyncio.run(run())
    assert plain.status_code == 500 and plain.json()["error"]["code"] == "generation_failed"
    assert "event: error" in streamed.text and "Traceback" not in streamed.text
    health = httpx.get(f"{s.url}/health")
    assert health.status_code == 503
    assert health.json()["models"] == {"tiny-gpt": "dead: RuntimeError", "tiny-mt": "ok"}
    assert httpx.get(f"{s.url}/ready").status_code == 503
    r = httpx.post(f"{s.url}/v1/generate", json={"prompt": "a"})
    assert r.status_code == 503 and r.json()["error"]["code"] == "engine_dead"
    r = httpx.post(f"{s.url}/v1/generate", json={"prompt": "a", "model": "tiny-mt", "max_tokens": 3})
    assert r.status_code == 200  # the other model's engine serves on

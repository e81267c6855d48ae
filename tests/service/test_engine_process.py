"""The engine core in its own process: the same answers as the in-process engine over the protocol's surfaces; a
core killed mid-stream ends every stream with an error within a second, /ready goes false, and the core is
restarted (or the server exits, as --on-engine-death says); a client that stops reading does not hold up the
others; the metrics go on across a restart."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import time
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from protocol_cases import COMPARED, parsed, same
from support import LiveServer, ServiceProcess, make_checkpoints, settings_for, stream_completion

from service.engine.client import EngineCoreClient


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """Two servers over the same checkpoints: the engines in core processes, and in the server's process."""
    root = make_checkpoints(tmp_path_factory.mktemp("ckpt"))
    proc = LiveServer(settings_for(root, engine_in_process=False))
    inproc = LiveServer(settings_for(root))
    yield proc, inproc
    proc.stop()
    inproc.stop()


LONG = {"max_model_len": 4096, "kv_cache_blocks": 4096}
@pytest.mark.parametrize(("path", "body"), COMPARED, ids=[f"{p}-{i}" for i, (p, _) in enumerate(COMPARED)])
def test_a_core_process_answers_as_the_in_process_engine(pair: Any, path: str, body: dict[str, Any]) -> None:
    proc, inproc = pair
    assert isinstance(proc.models["tiny-gpt"].engine, EngineCoreClient)
    a = httpx.post(proc.url + path, json=body, timeout=60)
    b = httpx.post(inproc.url + path, json=body, timeout=60)
    assert a.status_code == b.status_code, (a.text, b.text)
    assert same(parsed(a.text), parsed(b.text)), (a.text, b.text)


def test_streamed_events_are_the_same_from_a_core_process(pair: Any) -> None:
    proc, inproc = pair
    body = {"model": "tiny-gpt", "prompt": ["ROMEO:", "JULIET:"], "max_tokens": 16, "temperature": 0,
            "stream": True, "logprobs": 1, "stream_options": {"include_usage": True}}

    def events(url: str) -> dict[Any, list[Any]]:
        """Each choice's events in order (the two choices' events interleave as the steps fall)."""
        by_choice: dict[Any, list[Any]] = {}
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    event = json.loads(line[6:])
                    for choice in event["choices"] or [None]:
                        by_choice.setdefault(choice and choice["index"], []).append((choice, event.get("usage")))
        return by_choice

    a, b = events(proc.url), events(inproc.url)
    assert same(a, b), (a, b)


def test_a_killed_core_ends_every_stream_within_a_second_and_is_restarted(long_model: Path) -> None:
    server = LiveServer(settings_for(long_model, engine_in_process=False, **LONG))
    try:
        client = server.models["long-gpt"].engine
        assert isinstance(client, EngineCoreClient) and client.pid is not None
        body = {"prompt": "ROMEO:", "max_tokens": 4000, "ignore_eos": True, "stream": True}
        before = httpx.get(server.url + "/metrics").text

        async def run() -> tuple[list[tuple[list[Any], float]], float, int]:
            flags = [asyncio.Event() for _ in range(3)]
            tasks = [asyncio.create_task(stream_completion(server.url, body, f)) for f in flags]
            await asyncio.wait_for(asyncio.gather(*(f.wait() for f in flags)), 30)
            killed = time.monotonic()
            os.kill(client.pid, signal.SIGKILL)  # type: ignore[arg-type]
            await asyncio.sleep(0.3)
            async with httpx.AsyncClient() as c:
                ready = (await c.get(server.url + "/ready")).status_code
            return await asyncio.gather(*tasks), killed, ready

        results, killed, ready = asyncio.run(run())
        assert ready == 503, "/ready stays true after the engine process died"
        for events, ended in results:
            assert ended - killed < 1.0, f"a stream ended {ended - killed:.2f} s after the kill"
            error = json.loads(events[-2])["error"]
            assert error["code"] == "engine_dead" and events[-1] == "[DONE]", events[-3:]
        deadline = time.monotonic() + 60
        while httpx.get(server.url + "/ready").status_code != 200:
            assert time.monotonic() < deadline, "the core was not restarted"
            time.sleep(0.2)
        assert client.restarts == 1
        ok = httpx.post(server.url + "/v1/completions", json={"prompt": "ROMEO:", "max_tokens": 5, "ignore_eos": True},
                        timeout=30)
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 5
        after = httpx.get(server.url + "/metrics").text
        assert _count(after, 'attnserve_requests_finished_total{finish_reason="error",model="long-gpt"}') == \
            _count(before, 'attnserve_requests_finished_total{finish_reason="error",model="long-gpt"}') + 3
        assert _count(after, 'attnserve_generation_tokens_total{model="long-gpt"}') > \
            _count(before, 'attnserve_generation_tokens_total{model="long-gpt"}')
    finally:
        server.stop()


def _count(metrics: str, name: str) -> float:
    for line in metrics.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


def test_with_on_engine_death_exit_the_server_exits_non_zero(long_model: Path, tmp_path: Path) -> None:
    server = ServiceProcess(long_model, tmp_path / "log.txt", "--on-engine-death", "exit")
    try:
        cores = psutil.Process(server.proc.pid).children()
        core = next(p for p in cores if "spawn_main" in " ".join(p.cmdline()))
        core.kill()
        assert server.proc.wait(timeout=30) == 3, server.output()
        assert "engine process died" in server.output()
    finally:
        server.stop()


def test_a_client_that_stops_reading_is_aborted_and_does_not_hold_up_the_others(long_model: Path) -> None:
    server = LiveServer(settings_for(long_model, engine_in_process=False, max_stream_backlog=16, **LONG))
    try:
        stalled = socket.create_connection(("127.0.0.1", server.port))
        stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        # attention rows with every token: megabytes of events, more than the sockets' buffers hold
        payload = json.dumps({"prompt": "ROMEO:", "max_tokens": 500, "ignore_eos": True, "stream": True,
                              "return_attention": {"aggregation": "none"}})
        stalled.sendall((f"POST /v1/generate HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                         f"content-length: {len(payload)}\r\n\r\n{payload}").encode())
        t0 = time.monotonic()
        for _ in range(3):  # the others are served while the stalled one is not read
            r = httpx.post(server.url + "/v1/completions", json={"prompt": "JULIET:", "max_tokens": 200,
                                                                  "ignore_eos": True}, timeout=30)
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 200, r.text
        assert time.monotonic() - t0 < 20
        deadline = time.monotonic() + 30
        while 'attnserve_streams_overflowed_total{model="long-gpt"} 1.0' not in httpx.get(server.url + "/metrics").text:
            assert time.monotonic() < deadline, "the stalled stream was never aborted"
            time.sleep(0.2)
        engine = server.models["long-gpt"].engine
        deadline = time.monotonic() + 10
        while engine.snapshot().num_running:
            assert time.monotonic() < deadline, "the stalled request still runs"
            time.sleep(0.1)
        stalled.close()
    finally:
        server.stop()


@pytest.mark.parametrize("in_process", [False, True])
def test_the_access_log_counts_tokens_in_both_modes(long_model: Path, in_process: bool,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    server = LiveServer(settings_for(long_model, engine_in_process=in_process, log_level="info", **LONG))
    try:
        with caplog.at_level("INFO", logger="attnserve.app"):
            r = httpx.post(server.url + "/v1/completions", json={"prompt": "ROMEO:", "max_tokens": 7,
                                                                  "ignore_eos": True}, timeout=30)
            assert r.status_code == 200
            time.sleep(0.2)
        lines = [rec for rec in caplog.records if getattr(rec, "path", None) == "/v1/completions"]
        assert lines and lines[-1].completion_tokens == 7 and lines[-1].prompt_tokens == 6  # type: ignore[attr-defined]
    finally:
        server.stop()

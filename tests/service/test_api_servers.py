"""`--api-server-count 2`: two HTTP frontends on one port over the same engine cores. They answer as the
in-process engine does, whichever frontend takes a connection; every request counts once in the metrics whichever
frontend is scraped; a killed core ends the streams of both within a second and both come back after its
restart; a killed frontend is started again; SIGTERM drains both and the server exits 0 with no process left."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import httpx
import psutil
from protocol_cases import COMPARED, parsed, same
from support import LiveServer, ServiceProcess, make_checkpoints, settings_for, stream_completion

TWO = ("--api-server-count", "2")


def records(server: ServiceProcess) -> list[dict[str, Any]]:
    out = []
    for line in server.output().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def wait_for(server: ServiceProcess, msg: str, count: int, timeout: float = 120) -> list[dict[str, Any]]:
    """The server's log records with this message, once it holds `count` of them."""
    deadline = time.monotonic() + timeout
    while True:
        found = [r for r in records(server) if r.get("msg") == msg]
        if len(found) >= count:
            return found
        assert server.proc.poll() is None and time.monotonic() < deadline, server.output()[-3000:]
        time.sleep(0.2)


def served_by(server: ServiceProcess, path: str) -> set[int]:
    """The processes whose access log has a request to `path`."""
    return {r["pid"] for r in records(server) if r.get("msg") == "request" and r.get("path") == path}


def cores(server: ServiceProcess) -> list[psutil.Process]:
    frontends = {r["frontend_pid"] for r in records(server) if r.get("msg") == "frontend started"}
    return [p for p in psutil.Process(server.proc.pid).children()
            if "spawn_main" in " ".join(p.cmdline()) and p.pid not in frontends]


def totals(url: str) -> dict[str, float]:
    """The request counters of a /metrics page."""
    wanted = ("attnserve_requests_finished_total", "attnserve_prompt_tokens_total", "attnserve_generation_tokens_total")
    lines = httpx.get(url + "/metrics", timeout=10).text.splitlines()
    return {k: float(v) for k, v in (line.rsplit(" ", 1) for line in lines if line.startswith(wanted))}


def test_two_frontends_answer_as_the_in_process_engine_and_count_each_request_once(tmp_path: Path) -> None:
    root = make_checkpoints(tmp_path / "ckpt")
    server = ServiceProcess(root, tmp_path / "log.txt", *TWO)
    reference = LiveServer(settings_for(root, kv_cache_blocks=512))
    try:
        wait_for(server, "ready", 2)
        rounds = 4
        for path, body in COMPARED:
            expected = httpx.post(reference.url + path, json=body, timeout=60)
            for _ in range(rounds):  # a new connection each: either frontend may take it
                got = httpx.post(server.url + path, json=body, timeout=60)
                assert got.status_code == expected.status_code, (got.text, expected.text)
                assert same(parsed(got.text), parsed(expected.text)), (got.text, expected.text)
        assert len(served_by(server, "/v1/completions")) == 2, "one frontend took every connection"
        time.sleep(1.5)  # each frontend's engine snapshot reaches the shared files every second
        ours = [totals(server.url) for _ in range(6)]  # scraped through either frontend: the same sums
        theirs = totals(reference.url)
        for page in ours:
            assert page.keys() == theirs.keys()
            for name, value in theirs.items():
                assert page[name] == rounds * value, (name, page[name], value)
    finally:
        reference.stop()
        server.stop()


def test_a_killed_core_ends_the_streams_of_both_frontends_and_both_come_back(long_model: Path, tmp_path: Path) -> None:
    server = ServiceProcess(long_model, tmp_path / "log.txt", *TWO, "--max-model-len", "4096",
                            "--kv-cache-blocks", "8192")
    try:
        wait_for(server, "ready", 2)
        (core,) = cores(server)
        body = {"prompt": "ROMEO:", "max_tokens": 4000, "ignore_eos": True, "stream": True}

        async def run() -> tuple[list[tuple[list[str], float]], float, list[int]]:
            flags = [asyncio.Event() for _ in range(16)]  # the kernel hashes each to a frontend: 8 all went to one once
            tasks = [asyncio.create_task(stream_completion(server.url, body, f)) for f in flags]
            await asyncio.wait_for(asyncio.gather(*(f.wait() for f in flags)), 30)
            killed = time.monotonic()
            core.kill()
            await asyncio.sleep(0.3)
            ready = []
            for _ in range(6):
                async with httpx.AsyncClient() as c:
                    ready.append((await c.get(server.url + "/ready")).status_code)
            return await asyncio.gather(*tasks), killed, ready

        results, killed, ready = asyncio.run(run())
        assert ready == [503] * 6, f"/ready after the core died: {ready}"
        for events, ended in results:
            assert ended - killed < 1.0, f"a stream ended {ended - killed:.2f} s after the kill"
            assert json.loads(events[-2])["error"]["code"] == "engine_dead" and events[-1] == "[DONE]", events[-3:]
        assert len(served_by(server, "/v1/completions")) == 2, "the streams all went to one frontend"
        deadline = time.monotonic() + 90
        while any(httpx.get(server.url + "/ready").status_code != 200 for _ in range(6)):
            assert time.monotonic() < deadline, "the frontends did not come back after the core's restart"
            time.sleep(0.2)
        for _ in range(6):
            ok = httpx.post(server.url + "/v1/completions", json={"prompt": "ROMEO:", "max_tokens": 5,
                                                                   "ignore_eos": True}, timeout=30)
            assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 5, ok.text
    finally:
        server.stop()


def test_a_killed_frontend_is_restarted_and_sigterm_drains_both(long_model: Path, tmp_path: Path) -> None:
    server = ServiceProcess(long_model, tmp_path / "log.txt", *TWO, "--max-model-len", "4096",
                            "--kv-cache-blocks", "8192")
    try:
        (first,) = wait_for(server, "frontend started", 1)
        wait_for(server, "ready", 2)
        os.kill(first["frontend_pid"], signal.SIGKILL)
        wait_for(server, "frontend started", 2)
        wait_for(server, "ready", 3)
        children = psutil.Process(server.proc.pid).children(recursive=True)
        body = {"prompt": "ROMEO:", "max_tokens": 400, "ignore_eos": True, "stream": True}

        async def run() -> list[tuple[list[str], float]]:
            flags = [asyncio.Event() for _ in range(16)]  # the kernel hashes each to a frontend: 8 all went to one once
            tasks = [asyncio.create_task(stream_completion(server.url, body, f)) for f in flags]
            await asyncio.wait_for(asyncio.gather(*(f.wait() for f in flags)), 30)
            server.proc.send_signal(signal.SIGTERM)
            return await asyncio.gather(*tasks)

        for events, _ in asyncio.run(run()):
            assert json.loads(events[-2])["choices"][0]["finish_reason"] == "length", events[-3:]
            assert events[-1] == "[DONE]"
        assert server.proc.wait(timeout=60) == 0, server.output()[-3000:]
        # read once every frontend has exited: a frontend's access line follows its stream's last bytes, and the
        # first one's came after the client's read in a CI run (one frontend's lines not yet written)
        assert len(served_by(server, "/v1/completions")) == 2, "the streams all went to one frontend"
        _gone, alive = psutil.wait_procs(children, timeout=10)
        assert not alive, f"left running: {[p.cmdline() for p in alive]}"
    finally:
        server.stop()


def test_several_frontends_need_the_core_processes(tmp_path: Path) -> None:
    server = ServiceProcess(tmp_path, tmp_path / "log.txt", *TWO, "--engine-in-process", wait=False)
    assert server.proc.wait(timeout=60) == 2
    assert "--api-server-count above 1 needs the engine core processes" in server.output()

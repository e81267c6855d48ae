"""`python -m service` as a new user meets it: every flag explained, an unknown --default-model, a missing
--models-dir and a port in use refused with a clear message (the last two before any model loads), Ctrl-C that
says a second one stops at once and then does, and one log format: every line JSON (uvicorn's too), probes
unlogged unless asked for."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import time
from pathlib import Path

import httpx
from support import ServiceProcess

from service.__main__ import build_parser


def test_every_flag_has_help() -> None:
    parser = build_parser()
    flags = [a for a in parser._actions if a.option_strings and a.dest != "help"]
    assert len(flags) >= 15
    assert not [a.option_strings for a in flags if not a.help], "flags without help"
    text = parser.format_help()
    assert "--default-model" in text and "multi30k-en-de" in text and "make serve PORT=" in text


def test_an_unknown_default_model_stops_the_start(checkpoints_dir: Path, tmp_path: Path) -> None:
    p = ServiceProcess(checkpoints_dir, tmp_path / "server.log", "--default-model", "tiny-gtp", wait=False)
    try:
        assert p.proc.wait(timeout=120) == 2
    finally:
        p.stop()
    out = p.output()
    assert "Traceback" not in out, out
    line = next(json.loads(x) for x in out.splitlines() if '"cannot start' in x)
    assert "tiny-gtp" in line["msg"] and "tiny-gpt" in line["msg"] and "tiny-mt" in line["msg"]


def _refusal(p: ServiceProcess) -> dict:
    """The `cannot start` line of a process that must exit 2 at once, every line of its output JSON."""
    try:
        assert p.proc.wait(timeout=120) == 2, p.output()
    finally:
        p.stop()
    lines = [json.loads(x) for x in p.output().splitlines() if x.strip()]
    assert not any(x["msg"] == "model ready" for x in lines), "refused only after loading the models"
    return next(x for x in lines if x["msg"].startswith("cannot start"))


def test_a_missing_models_dir_stops_the_start(tmp_path: Path) -> None:
    line = _refusal(ServiceProcess(tmp_path / "no-such-dir", tmp_path / "server.log", wait=False))
    assert line["level"] == "error" and str(tmp_path / "no-such-dir") in line["msg"] and "no such folder" in line["msg"]


def test_a_port_in_use_stops_the_start_before_the_models_load(checkpoints_dir: Path, tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        line = _refusal(ServiceProcess(checkpoints_dir, tmp_path / "server.log", "--port", str(port), wait=False))
    assert f"127.0.0.1:{port}" in line["msg"] and "--port" in line["msg"], line


def test_ctrl_c_says_how_to_stop_at_once_and_a_second_one_does(checkpoints_dir: Path, tmp_path: Path) -> None:
    """40 long requests through one slot drain for seconds; the second SIGINT ends the process within a moment,
    dead of SIGINT (exit status 130 in a shell), and stderr stays JSON lines: no KeyboardInterrupt traceback."""
    p = ServiceProcess(checkpoints_dir, tmp_path / "server.log", "--max-num-seqs", "1", "--drain-timeout", "60")
    body = {"prompt": "ROMEO:", "max_tokens": 120, "ignore_eos": True, "temperature": 0}

    async def run() -> float:
        async with httpx.AsyncClient(base_url=p.url, timeout=120) as c:
            requests = [asyncio.create_task(c.post("/v1/generate", json=body)) for _ in range(40)]
            await asyncio.wait(requests, return_when=asyncio.FIRST_COMPLETED)
            p.proc.send_signal(signal.SIGINT)
            while "press Ctrl-C again" not in p.output():
                assert p.proc.poll() is None, p.output()
                await asyncio.sleep(0.02)
            t0 = time.monotonic()
            p.proc.send_signal(signal.SIGINT)
            await asyncio.to_thread(p.proc.wait, 30)
            await asyncio.gather(*requests, return_exceptions=True)
            return time.monotonic() - t0

    try:
        elapsed = asyncio.run(run())
        assert p.proc.returncode == -signal.SIGINT, p.output()
    finally:
        p.stop()
    assert elapsed < 3.0, elapsed
    out = p.output()
    assert "Traceback" not in out and "KeyboardInterrupt" not in out, out
    lines = [json.loads(x) for x in out.splitlines() if x.strip()]  # every line JSON
    first = next(x for x in lines if x["msg"].startswith("draining"))
    assert first["signal"] == "SIGINT" and "press Ctrl-C again to stop at once" in first["msg"]
    assert any(x["msg"] == "second signal: stopping now" for x in lines)


def _lines_after_a_run(checkpoints_dir: Path, log: Path, *args: str) -> list[dict]:
    p = ServiceProcess(checkpoints_dir, log, "--default-model", "tiny-gpt", *args)
    try:
        for _ in range(3):
            assert httpx.get(f"{p.url}/health").status_code == 200
        assert httpx.get(f"{p.url}/v1/models").status_code == 200
        p.proc.send_signal(signal.SIGTERM)
        assert p.proc.wait(timeout=60) == 0
    finally:
        p.stop()
    lines = [x for x in p.output().splitlines() if x.strip()]
    parsed = []
    for x in lines:
        try:
            parsed.append(json.loads(x))
        except json.JSONDecodeError:
            raise AssertionError(f"a log line that is not JSON: {x!r}") from None
    return parsed


def test_all_log_lines_are_json_and_probes_are_not_logged(checkpoints_dir: Path, tmp_path: Path) -> None:
    lines = _lines_after_a_run(checkpoints_dir, tmp_path / "server.log")
    assert any(x["logger"].startswith("uvicorn") for x in lines), "uvicorn's own lines are there, as JSON"
    assert not any("color_message" in x for x in lines)
    ready = next(x for x in lines if x["msg"] == "ready")
    assert ready["default_model"] == "tiny-gpt"
    paths = [x["path"] for x in lines if x["msg"] == "request"]
    assert paths == ["/v1/models"], paths


def test_log_probes_logs_them(checkpoints_dir: Path, tmp_path: Path) -> None:
    lines = _lines_after_a_run(checkpoints_dir, tmp_path / "server.log", "--log-probes")
    paths = [x["path"] for x in lines if x["msg"] == "request"]
    assert paths.count("/health") == 3 and "/ready" in paths and "/v1/models" in paths

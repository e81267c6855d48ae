"""`python -m service` as a new user meets it: every flag explained, an unknown --default-model refused with a
clear message, and one log format: every line JSON (uvicorn's too), probes unlogged unless asked for."""

from __future__ import annotations

import json
import signal
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

"""A real Prometheus (Debian's) reads the service: promtool lints the exposition and deploy/prometheus.yml, a
Prometheus server scrapes a live server with that config and its PromQL answers match the known load, and every
Grafana dashboard query runs against it."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from support import free_port

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "deploy" / "prometheus.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "attnserve.json"
PROMTOOL, PROMETHEUS = shutil.which("promtool"), shutil.which("prometheus")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed (Debian package prometheus)")
needs_prometheus = pytest.mark.skipif(PROMETHEUS is None,
                                      reason="prometheus not installed (Debian package prometheus)")
MODEL = "tiny-gpt"
LOAD = (5, 7, 9)  # max_tokens of the requests sent; ignore_eos makes each output exactly this long


def send_load(url: str) -> None:
    for n in LOAD:
        r = httpx.post(f"{url}/v1/generate", json={"prompt": "ROMEO:", "max_tokens": n, "temperature": 0,
                                                    "ignore_eos": True, "stream": n == 7}, timeout=60)
        assert r.status_code == 200, r.text
    assert httpx.post(f"{url}/v1/generate", json={"prompt": "x", "max_tokens": 500}).status_code == 400


@needs_promtool
def test_promtool_accepts_the_config() -> None:
    r = subprocess.run([str(PROMTOOL), "check", "config", str(CONFIG)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


@needs_promtool
def test_promtool_finds_no_problem_in_the_exposition(make_server: Callable[..., Any]) -> None:
    server = make_server()
    send_load(server.url)
    text = httpx.get(f"{server.url}/metrics").text
    assert "attnserve_requests_rejected_total" in text and "attnserve_time_to_first_token_seconds_bucket" in text
    r = subprocess.run([str(PROMTOOL), "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and not (r.stdout + r.stderr).strip(), r.stdout + r.stderr


class Prometheus:
    """A Prometheus server on a free loopback port, reading `config`, storing in `data`; always stopped."""

    def __init__(self, config: Path, data: Path, log: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        with log.open("wb") as out:
            self.proc = subprocess.Popen(
                [str(PROMETHEUS), f"--config.file={config}", f"--storage.tsdb.path={data}",
                 f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
                stdout=out, stderr=subprocess.STDOUT)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=15)

    def query(self, promql: str) -> list[dict[str, Any]]:
        r = httpx.get(f"{self.url}/api/v1/query", params={"query": promql}, timeout=10)
        body = r.json()
        assert r.status_code == 200 and body["status"] == "success", f"{promql}: {body}"
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    def wait_for(self, promql: str, expected: float, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        values: list[float] = []
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"prometheus exited: {self.log.read_text()[-2000:]}"
            try:
                values = [float(s["value"][1]) for s in self.query(promql)]
            except httpx.TransportError:
                values = []
            if values == [expected]:
                return
            time.sleep(0.25)
        pytest.fail(f"{promql} = {values}, expected [{expected}]; log: {self.log.read_text()[-2000:]}")


@pytest.fixture
def prometheus_for(tmp_path: Path) -> Iterator[Callable[[str], Prometheus]]:
    """prometheus_for("127.0.0.1:port"): deploy/prometheus.yml with its target rewritten and a 1 s interval."""
    started: list[Prometheus] = []

    def start(target: str) -> Prometheus:
        config = yaml.safe_load(CONFIG.read_text())
        config["global"].update(scrape_interval="1s", scrape_timeout="1s", evaluation_interval="1s")
        (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "attnserve"]
        assert job["static_configs"][0]["targets"] == ["api:8000"]  # what docker-compose serves
        job["static_configs"][0]["targets"] = [target]
        path = tmp_path / "prometheus.yml"
        path.write_text(yaml.safe_dump(config))
        started.append(Prometheus(path, tmp_path / "data", tmp_path / "prometheus.log"))
        return started[-1]

    yield start
    for p in started:
        p.stop()


@needs_prometheus
def test_prometheus_scrapes_the_service_and_counts_the_load(
    make_server: Callable[..., Any], prometheus_for: Callable[[str], Prometheus]
) -> None:
    server = make_server()
    prom = prometheus_for(f"127.0.0.1:{server.port}")
    prom.wait_for('up{job="attnserve"}', 1)
    send_load(server.url)  # after the first scrape, so rate() sees the increase
    prom.wait_for(f'sum(attnserve_generation_tokens_total{{model="{MODEL}"}})', sum(LOAD))
    prom.wait_for(f'attnserve_requests_finished_total{{model="{MODEL}", finish_reason="length"}}', len(LOAD))
    prom.wait_for(f'attnserve_requests_rejected_total{{model="{MODEL}", reason="too_long"}}', 1)
    prom.wait_for(f'attnserve_time_to_first_token_seconds_count{{model="{MODEL}"}}', len(LOAD))
    prom.wait_for('count(attnserve_engine_up{job="attnserve"} == 1)', len(server.models))

    # every dashboard query runs; the headline panels have data for the model that served the load
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = {t["expr"]: p["title"] for p in dashboard["panels"] for t in p.get("targets", [])}
    with_data: set[str] = set()
    for expr, title in exprs.items():
        result = prom.query(expr.replace("$model", MODEL).replace("$__rate_interval", "1m"))
        if any(s["metric"].get("model") == MODEL and s["value"][1] not in ("NaN", "0") for s in result):
            with_data.add(title)
    for title in ("Generation throughput", "Time to first token", "Inter-token latency", "Batch size per step",
                  "End-to-end request latency", "Rejected requests by reason", "Served models"):
        assert title in with_data, f"panel {title!r} shows nothing after the load"

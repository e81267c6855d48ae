"""The Docker image, built and run for real: serve, stream, metrics, non-root, built-in models, SIGTERM drain.

Containers use the host network and bind 127.0.0.1 only. The base image comes from ATTNSERVE_BASE_IMAGE
(a local image for machines without a registry), else the Dockerfile's default."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from httpx_sse import connect_sse
from prometheus_client.parser import text_string_to_metric_families
from support import free_port

from model.checkpoint import load_checkpoint, save_checkpoint
from model.config import preset
from model.transformer import build_model

ROOT = Path(__file__).resolve().parents[2]
IMAGE = "attnserve:test"
DEFAULT_BASE = "python:3.11-slim"
BUILD_TIMEOUT = 1200  # a cold build installs torch and the dependencies; a warm one reuses cached layers
DRAIN_TIMEOUT = 60
LONG_STREAM = 8000  # tokens: seconds of streaming even on the fused step, so SIGTERM lands mid-stream


def docker(*args: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout, check=check)


def base_image() -> str:
    return os.environ.get("ATTNSERVE_BASE_IMAGE") or DEFAULT_BASE


@pytest.fixture(scope="module")
def image() -> str:
    """Build the image (with the host network, as the only network a build may use here)."""
    if shutil.which("docker") is None:
        pytest.skip("no docker CLI on PATH")
    if docker("info", check=False, timeout=30).returncode != 0:
        pytest.skip("no Docker engine answers `docker info`")
    base = base_image()
    if docker("image", "inspect", base, check=False).returncode != 0 and \
            docker("pull", base, check=False, timeout=300).returncode != 0:
        pytest.skip(f"base image {base} is neither present nor pullable; set ATTNSERVE_BASE_IMAGE")
    build = docker("build", "--network", "host", "--build-arg", f"BASE_IMAGE={base}", "-t", IMAGE, str(ROOT),
                   check=False, timeout=BUILD_TIMEOUT)
    assert build.returncode == 0, build.stdout[-4000:] + build.stderr[-4000:]
    return IMAGE


@pytest.fixture(scope="module")
def models_dir(checkpoints_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny-gpt and tiny-mt, plus long-gpt (context 8192) for streams long enough to stop in the middle."""
    root = tmp_path_factory.mktemp("container") / "models"
    shutil.copytree(checkpoints_dir, root)
    torch.manual_seed(0)
    char = load_checkpoint(root / "tiny-gpt").tokenizer
    save_checkpoint(build_model(preset("tiny-gpt", vocab_size=char.vocab_size, max_len=8192)), char, root / "long-gpt")
    for path in [root, *root.rglob("*")]:  # the container runs as another user; pytest's folders are 0700
        path.chmod(0o755 if path.is_dir() else 0o644)
    return root


class Container:
    """One `docker run -d` of the image on the host network, serving on a free loopback port."""

    def __init__(self, image: str, env: dict[str, str], volumes: dict[Path, str] | None = None) -> None:
        self.name = f"attnserve-test-{uuid.uuid4().hex[:10]}"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {"ATTNSERVE_HOST": "127.0.0.1", "ATTNSERVE_PORT": str(self.port), "ATTNSERVE_LOG_LEVEL": "warning",
               "ATTNSERVE_KV_CACHE_BLOCKS": "256", **env}
        args = ["run", "-d", "--name", self.name, "--network", "host",
                "--read-only", "--tmpfs", "/tmp",  # as under the Kubernetes securityContext
                "--health-interval", "1s", "--health-start-period", "60s"]
        for key, value in env.items():
            args += ["-e", f"{key}={value}"]
        for host, inside in (volumes or {}).items():
            args += ["-v", f"{host}:{inside}:ro"]
        docker(*args, image)

    def state(self, field: str) -> str:
        return docker("inspect", "-f", "{{" + field + "}}", self.name).stdout.strip()

    def logs(self) -> str:
        out = docker("logs", "--tail", "40", self.name, check=False)
        return out.stdout + out.stderr

    def wait_for(self, path: str, timeout: float = 120) -> httpx.Response:
        """Poll until `path` answers 200; fail early (with the logs) if the container stops."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.state(".State.Running") == "true", f"container exited:\n{self.logs()}"
            try:
                r = httpx.get(self.url + path, timeout=5)
                if r.status_code == 200:
                    return r
            except httpx.TransportError:
                pass
            time.sleep(0.25)
        raise AssertionError(f"{path} never answered 200 within {timeout}s:\n{self.logs()}")

    def remove(self) -> None:
        docker("rm", "-f", self.name, check=False)


@pytest.fixture
def run_container(image: str) -> Iterator[Any]:
    """Factory: run_container(env, volumes) -> Container; every container is removed at teardown."""
    made: list[Container] = []

    def run(env: dict[str, str] | None = None, volumes: dict[Path, str] | None = None) -> Container:
        made.append(Container(image, env or {}, volumes))
        return made[-1]

    yield run
    for c in made:
        c.remove()


def mounted(models_dir: Path, **env: str) -> dict[str, Any]:
    return {"env": {"ATTNSERVE_MODELS_DIR": "/models", **env}, "volumes": {models_dir: "/models"}}


def stream_tokens(url: str, body: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    with httpx.Client(timeout=120) as client, connect_sse(client, "POST", f"{url}/v1/generate",
                                                          json={**body, "stream": True}) as events:
        assert events.response.status_code == 200, events.response.read().decode()
        for event in events.iter_sse():
            yield event.event, json.loads(event.data)


def test_serves_streams_and_exports_metrics(run_container: Any, models_dir: Path) -> None:
    c = run_container(**mounted(models_dir))
    c.wait_for("/ready")
    names = [m["id"] for m in httpx.get(f"{c.url}/v1/models").json()["data"]]
    assert names == ["long-gpt", "tiny-gpt", "tiny-mt"]

    body = {"model": "tiny-gpt", "prompt": "ROMEO:", "max_tokens": 24, "temperature": 0, "ignore_eos": True}
    plain = httpx.post(f"{c.url}/v1/generate", json=body, timeout=60)
    assert plain.status_code == 200, plain.text
    assert plain.json()["usage"]["completion_tokens"] == 24
    events = list(stream_tokens(c.url, body))
    assert "".join(data["text"] for kind, data in events if kind == "token") == plain.json()["text"]
    assert events[-1][0] == "done" and events[-1][1]["finish_reason"] == "length"

    metrics = httpx.get(f"{c.url}/metrics").text
    samples = {(s.name, s.labels.get("model")): s.value
               for family in text_string_to_metric_families(metrics) for s in family.samples}
    assert samples[("attnserve_generation_tokens_total", "tiny-gpt")] >= 48
    assert samples[("attnserve_engine_up", "tiny-mt")] == 1

    deadline = time.monotonic() + 30  # the image's own HEALTHCHECK command, run every second here
    while c.state(".State.Health.Status") != "healthy" and time.monotonic() < deadline:
        time.sleep(0.5)
    assert c.state(".State.Health.Status") == "healthy"

    uid = docker("exec", c.name, "id", "-u").stdout.strip()
    assert uid.isdigit() and uid != "0"


def test_builtin_models_dir_serves_what_ships(run_container: Any) -> None:
    shipped = sorted(p.name for p in (ROOT / "model" / "checkpoints").glob("*")
                     if (p / "config.json").is_file() and not p.name.endswith(".train-state"))
    c = run_container({"ATTNSERVE_KV_CACHE_BLOCKS": "64", "ATTNSERVE_WARMUP": "false"})
    c.wait_for("/health")
    names = sorted(m["id"] for m in httpx.get(f"{c.url}/v1/models").json()["data"])
    assert names == shipped
    ready = httpx.get(f"{c.url}/ready")
    assert ready.status_code == (200 if shipped else 503), ready.text  # no models: alive but never ready
    if shipped:
        r = httpx.post(f"{c.url}/v1/generate", json={"model": shipped[0], "prompt": "The", "max_tokens": 4},
                       timeout=60)
        assert r.status_code == 200, r.text


def test_sigterm_drains_a_stream_then_exits_zero(run_container: Any, models_dir: Path) -> None:
    c = run_container(**mounted(models_dir, ATTNSERVE_DRAIN_TIMEOUT=str(DRAIN_TIMEOUT),
                                ATTNSERVE_MAX_TOKENS_LIMIT=str(LONG_STREAM), ATTNSERVE_MAX_STREAM_BACKLOG=str(LONG_STREAM),
                                ATTNSERVE_MAX_MODEL_LEN=str(LONG_STREAM + 64), ATTNSERVE_KV_CACHE_BLOCKS="1024"))
    c.wait_for("/ready")
    seen: dict[str, Any] = {}

    def watch_draining() -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                r = httpx.get(f"{c.url}/ready", timeout=2)
            except httpx.TransportError:
                return
            if r.status_code == 503:
                seen["draining_at"] = time.monotonic()
                seen["ready"] = r.json()["status"]
                seen["new_request"] = httpx.post(f"{c.url}/v1/generate", json={"prompt": "x"}, timeout=5).status_code
                return
            time.sleep(0.05)

    stop: subprocess.Popen[str] | None = None
    watcher = threading.Thread(target=watch_draining, daemon=True)
    tokens, done = 0, None
    body = {"model": "long-gpt", "prompt": "ROMEO:", "max_tokens": LONG_STREAM, "temperature": 0, "ignore_eos": True}
    for kind, data in stream_tokens(c.url, body):
        if kind == "token":
            tokens += 1
            if tokens == 5:  # SIGTERM mid-stream; docker would SIGKILL only after the grace period
                stop = subprocess.Popen(["docker", "stop", "-t", str(DRAIN_TIMEOUT + 30), c.name], text=True,
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                watcher.start()
        elif kind == "done":
            done, seen["done_at"] = data, time.monotonic()
    assert stop is not None
    stop.communicate(timeout=DRAIN_TIMEOUT + 60)
    watcher.join(timeout=10)

    assert done is not None and done["finish_reason"] == "length", done
    assert tokens == LONG_STREAM and done["usage"]["completion_tokens"] == LONG_STREAM
    assert seen.get("ready") == "draining" and seen["draining_at"] < seen["done_at"], seen  # stopped mid-stream
    assert seen["new_request"] == 503
    assert c.state(".State.Running") == "false"
    assert c.state(".State.ExitCode") == "0", c.logs()

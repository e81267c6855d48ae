"""Loading the served models at start: each engine core in its own process (the default), or every engine on a
thread of this process (`--engine-in-process`)."""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

import torch

from model.checkpoint import CheckpointError
from service.core_process import launch_core, server_side_checkpoint
from service.engine.attached import AttachedCoreClient
from service.engine.client import EngineCoreClient, Frontend
from service.registry import ServedModel, build_served_model, discover, model_name, warm_up
from service.settings import Settings

log = logging.getLogger("attnserve.registry")


def load_models(
    settings: Settings,
    on_step: Any = None,
    on_finish: Any = None,
    on_fatal: Any = None,
    attach: dict[str, Frontend] | None = None,
) -> dict[str, ServedModel]:
    """Every discovered checkpoint, warmed up and with its engine started. A bad checkpoint stops the start.
    Each engine core runs in its own process (service/core_process.py) unless settings.engine_in_process;
    `attach` (a frontend after the first, service/frontends.py) names the sockets of cores another process owns."""
    if attach is not None:
        models = load_attached(settings, attach, on_step, on_finish, on_fatal)
    elif settings.engine_in_process:
        models = load_in_process(settings, on_step, on_finish)
    else:
        models = load_in_core_processes(settings, on_step, on_finish, on_fatal)
    for served in models.values():
        served.engine.start()
        log.info("model ready", extra={"model": served.name, **served.describe()})
    return models


def load_in_core_processes(settings: Settings, on_step: Any, on_finish: Any, on_fatal: Any) -> dict[str, ServedModel]:
    """Start every core process first (they load in parallel with each other and with this process), then read
    each checkpoint's tokenizer and configuration here, then wait for each core to say it is ready."""
    clients: dict[str, tuple[Path, EngineCoreClient]] = {}
    models: dict[str, ServedModel] = {}
    try:
        for path in discover(settings):
            name = model_name(path)
            if name in clients:
                raise CheckpointError(f"model {name}: two models share this name")
            clients[name] = path, launch_core(path, name, settings, on_step, on_finish, on_fatal)
        for name, (path, client) in clients.items():
            models[name] = _served(name, path, client, settings)
    except BaseException:
        for _, client in clients.values():
            client.stop()
        raise
    torch.set_num_threads(1)  # this process runs no model: its event loop's thread keeps one intra-op thread
    return models


def load_attached(settings: Settings, attach: dict[str, Frontend], on_step: Any, on_finish: Any,
                  on_fatal: Any) -> dict[str, ServedModel]:
    """The tokenizer and configuration of every model here, over the cores the first frontend started."""
    models: dict[str, ServedModel] = {}
    try:
        for path in discover(settings):
            name = model_name(path)
            client = AttachedCoreClient(name, attach[name], settings.max_stream_backlog, on_step, on_finish, on_fatal)
            models[name] = _served(name, path, client, settings)
    except BaseException:
        for served in models.values():
            served.engine.stop()
        raise
    torch.set_num_threads(1)
    return models


def _served(name: str, path: Path, client: EngineCoreClient, settings: Settings) -> ServedModel:
    """The server's side of a model whose core runs elsewhere, once that core says it is ready."""
    try:
        ckpt = server_side_checkpoint(path)
    except CheckpointError as e:
        raise CheckpointError(f"model {name}: {e}") from e
    client.decode = ckpt.tokenizer.decode
    ready = client.wait_ready()
    return ServedModel(name, ckpt, client, ready.device, getattr(torch, ready.dtype), settings.quantization,
                       ready.parameters, kv_cache_dtype=settings.kv_cache_dtype)


def load_in_process(settings: Settings, on_step: Any, on_finish: Any) -> dict[str, ServedModel]:
    """The engines on threads of this process. The models are loaded and warmed up on a worker thread that then
    exits, and the calling thread (the event loop's) is left with one intra-op thread, so that the only OpenMP
    team alive is the engine's (benchmarks/NOTES.md, section 10: libgomp makes idle workers sleep at once when
    teams outnumber the cores)."""
    threads = settings.threads or torch.get_num_threads()
    models: dict[str, ServedModel] = {}
    failure: list[BaseException] = []

    def load() -> None:
        torch.set_num_threads(threads)
        try:
            for path in discover(settings):
                served = _load_one(path, settings, on_step, on_finish)
                if served.name in models:
                    raise CheckpointError(f"model {served.name}: two models share this name")
                models[served.name] = served
        except BaseException as e:  # re-raised on the caller's thread
            failure.append(e)

    worker = threading.Thread(target=load, name="load-models", daemon=True)  # Ctrl-C is not held up
    worker.start()
    worker.join()
    torch.set_num_threads(1)
    if failure:
        for served in models.values():
            served.engine.stop()
        raise failure[0]
    return models


def _load_one(path: Path, settings: Settings, on_step: Any, on_finish: Any) -> ServedModel:
    try:
        served = build_served_model(path, settings, on_step, on_finish)
    except CheckpointError as e:
        raise CheckpointError(f"model {model_name(path)}: {e}") from e
    if settings.warmup:
        warm_up(served)
    return served

"""`create_app(settings)`: the FastAPI application and its lifespan (load, warm up, serve, drain, stop)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
from fastapi import FastAPI, Request, Response
from fastapi.middleware.cors import CORSMiddleware
from fastapi.staticfiles import StaticFiles
from fastapi_offline import FastAPIOffline

from service import __version__
from service.errors import install
from service.gatekeeper import BodyLimit, Gatekeeper
from service.loading import load_models
from service.logs import setup_logging
from service.metrics import CONTENT_TYPE, Metrics, shared_metrics
from service.registry import ServedModel, discover
from service.routes import attention, chat, generate, health, models, openai, pages, vllm
from service.routes.pages import DOCS_ASSETS, STATIC, VIEWER_ASSETS
from service.settings import Settings, SettingsError

log = logging.getLogger("attnserve.app")


async def drain_engines(app: FastAPI, timeout: float) -> None:
    """Stop taking requests; let in-flight ones finish within `timeout`, then abort the rest."""
    app.state.draining = True
    served: dict[str, ServedModel] = getattr(app.state, "models", {})
    await asyncio.gather(*(m.engine.drain(timeout) for m in served.values()))


def default_model(models: dict[str, ServedModel]) -> str | None:
    """The model of requests that name none: the largest decoder-only language model by parameter count (a chat
    model such as SmolLM2 when one is served, else the shipped shakespeare-gpt), never a translator that merely
    sorts first, which would answer `{"prompt": "hi"}` in German; with no language model, the first by name."""
    lms = [m for m in models.values() if not m.is_encoder_decoder]
    if lms:
        return max(lms, key=lambda m: m.describe()["parameters"]).name
    return min(models) if models else None


def engine_failed(app: FastAPI, reason: str) -> None:
    """An engine core died and is not restarted (--on-engine-death exit): the server stops, exit status 3, for its
    supervisor (a container's restart policy) to start it again. `python -m service` installs the stop as
    app.state.on_fatal; without it (a server embedded elsewhere) the server stays up, unready."""
    log.critical("engine process died; stopping the server", extra={"reason": reason})
    app.state.engine_failed = reason
    stop = getattr(app.state, "on_fatal", None)
    if stop is not None:
        stop()


async def sample_engines(app: FastAPI, every: float = 1.0) -> None:
    """With several frontends: each one's counts that its engine snapshots carry (streams overflowed, restarts)
    and the engine gauges reach the shared metrics files whichever frontend is scraped."""
    while True:
        await asyncio.sleep(every)
        app.state.metrics.sample_engines(app.state.models)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    setup_logging(settings.log_level, settings.log_json)
    metrics = Metrics()
    api_keys = [k.encode() for k in settings.all_api_keys()]

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if settings.models_dir is not None and not settings.models_dir.is_dir():  # else: a server with no model
            raise SettingsError(f"models dir {settings.models_dir}: no such folder (--models-dir, "
                                "ATTNSERVE_MODELS_DIR)")
        found = [p.name for p in discover(settings)]
        if settings.default_model is not None and settings.default_model not in found:
            raise SettingsError(f"default model '{settings.default_model}' is not among the served models "
                                f"{sorted(found)}")
        app.state.models = load_models(settings, metrics.record_step, metrics.record_finish,
                                       lambda reason: engine_failed(app, reason), app.state.core_addresses)
        for name, served in app.state.models.items():
            metrics.add_model(name, served.describe())
        names = list(app.state.models)
        app.state.default_model = settings.default_model or default_model(app.state.models)
        if not names:
            log.warning("no model to serve: no checkpoint folder (with a config.json) was found",
                        extra={"models_dir": str(settings.models_dir), "models": [str(p) for p in settings.models]})
        async with anyio.create_task_group():  # load anyio's backend now, not in the first stream's response
            pass
        frontends = app.state.frontends
        if frontends is not None:
            frontends.start(app.state.models)
        sampler = asyncio.create_task(sample_engines(app)) if shared_metrics() else None
        app.state.ready = True  # the server logs "ready" once its port listens (service/server.py)
        try:
            yield
        finally:
            app.state.ready = False
            await drain_engines(app, 0 if app.state.draining else settings.drain_timeout)
            if frontends is not None:  # they drain too (a signal reached them) before their cores stop
                await asyncio.to_thread(frontends.stop, settings.drain_timeout + 5)
            if sampler is not None:
                sampler.cancel()
            for served in app.state.models.values():
                served.engine.stop()
                metrics.set_engine_up(served.name, False)

    app = FastAPIOffline(  # /docs and /redoc from assets in the package, not a CDN
        static_url=DOCS_ASSETS,
        title="attnserve",
        version=__version__,
        description="Serve Transformers with continuous batching, streaming, an OpenAI-compatible API, "
        "and attention inspection.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.models = {}
    app.state.default_model = None
    app.state.ready = False
    app.state.draining = False
    app.state.started = time.time()
    app.state.frontends = None  # the other frontends, where this process starts them (service/frontends.py)
    app.state.frontend = 0  # which frontend this process is (--api-server-count)
    app.state.core_addresses = None  # a frontend after the first: the sockets of the cores it attaches to
    install(app)
    # each router included once, with its one tag: /docs lists an operation under every tag it carries
    for router in (health.router, models.router, vllm.router, generate.router, openai.router, chat.router,
                   attention.router, pages.router):
        app.include_router(router)
    app.mount(VIEWER_ASSETS, StaticFiles(directory=STATIC), name="viewer-assets")

    @app.get("/metrics", include_in_schema=False)
    async def metrics_endpoint(request: Request) -> Response:
        metrics.sample_engines(request.app.state.models)
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)  # inside the gatekeeper: its 413 is logged
    app.add_middleware(Gatekeeper, settings=settings, metrics=metrics, api_keys=api_keys,
                       open_prefixes=(VIEWER_ASSETS + "/", DOCS_ASSETS + "/"))
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type", "X-Request-ID"])
    return app

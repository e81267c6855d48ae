"""`python -m service`: serve the models over HTTP. Flags override ATTNSERVE_* environment variables.

SIGTERM drains: /ready turns 503 and new requests get 503 while in-flight requests finish (up to the drain
timeout); the rest end with finish_reason "abort"; then the server exits 0. A second signal exits at once."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import socket
import sys
from pathlib import Path
from types import FrameType
from typing import Any, cast

import uvicorn
from fastapi import FastAPI

from model.checkpoint import CheckpointError
from service.app import create_app, drain_engines
from service.settings import Settings

log = logging.getLogger("attnserve.server")


class DrainingServer(uvicorn.Server):
    """uvicorn, but the first SIGTERM/SIGINT drains the engines before the server stops."""

    def __init__(self, config: uvicorn.Config, settings: Settings) -> None:
        super().__init__(config)
        self.app = cast(FastAPI, config.app)
        self.settings = settings
        self._draining = False

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        """Run the app's lifespan around uvicorn (not inside it), so that a model that cannot load ends the start
        with its own error instead of a lifespan traceback, and before the port opens."""
        async with self.app.router.lifespan_context(self.app):
            await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._draining or not hasattr(self.config, "loaded_app"):
            return super().handle_exit(sig, frame)
        self._draining = True
        log.info("draining", extra={"signal": signal.Signals(sig).name, "timeout_s": self.settings.drain_timeout})
        asyncio.get_event_loop().create_task(self._drain())

    async def _drain(self) -> None:
        await drain_engines(self.app, self.settings.drain_timeout)
        await asyncio.sleep(0.2)  # let the last events of aborted streams go out
        self.should_exit = True


def parse_args(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog="python -m service", description="Serve Transformers over HTTP.")
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p.add_argument("--models-dir", type=Path, help="serve every checkpoint folder under it")
    p.add_argument("--model", dest="models", action="append", type=Path, help="a checkpoint folder (repeatable)")
    p.add_argument("--no-default-models", action="store_true", help="do not serve the shipped models")
    p.add_argument("--default-model")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"])
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--threads", type=int)
    p.add_argument("--kv-cache-blocks", type=int)
    p.add_argument("--max-num-seqs", type=int)
    p.add_argument("--api-key", dest="api_keys", action="append")
    p.add_argument("--drain-timeout", type=float)
    p.add_argument("--log-level")
    args = vars(p.parse_args(argv))
    if args.pop("no_default_models"):
        args["models_dir"] = None
        args["_no_models_dir"] = True
    return {k: v for k, v in args.items() if v is not None}


def main(argv: list[str] | None = None) -> None:
    overrides = parse_args(argv)
    no_dir = overrides.pop("_no_models_dir", False)
    settings = Settings(**overrides)
    if no_dir:
        settings.models_dir = None
    try:
        app = create_app(settings)
        config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level,
                                access_log=False, timeout_graceful_shutdown=5, lifespan="off")
        DrainingServer(config, settings).run()
    except (CheckpointError, OSError) as e:  # a bad model folder or file: say which, no traceback
        log.error("cannot start: %s", e, extra={"error": str(e)})
        sys.exit(2)
    sys.exit(0)


if __name__ == "__main__":
    main()

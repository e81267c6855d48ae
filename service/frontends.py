"""More HTTP frontends over the same engine cores: `--api-server-count N` (vLLM's flag).

The first frontend is the process `python -m service` started: it starts every model's engine core (each core
gets one pair of sockets per frontend, service/engine/core.py) and, once they are ready, the N - 1 others. Each
other frontend is a fresh interpreter that reads the tokenizers, attaches to the running cores
(service/engine/attached.py), then listens on the same port (SO_REUSEPORT: the kernel spreads connections over
the frontends, service/server.py) and tokenizes, detokenizes, renders and streams its own requests, so that the
HTTP side of a busy server has more than one GIL.

The first frontend passes its signals on (the others drain as it does, and it waits for them before it stops the
cores), starts again a frontend that dies, and stops them all when it stops. Metrics are shared through
prometheus_client's multiprocess files (service/metrics.py): any frontend's /metrics shows every request."""

from __future__ import annotations

import logging
import multiprocessing
import os
import select
import signal
import sys
import threading
import time
from collections.abc import Mapping
from multiprocessing.connection import wait
from multiprocessing.process import BaseProcess
from typing import TYPE_CHECKING, cast

from service.engine.client import EngineCoreClient
from service.engine.wire import Frontend
from service.metrics import forget_process
from service.settings import Settings

if TYPE_CHECKING:
    from service.registry import ServedModel

log = logging.getLogger("attnserve.server")


class Frontends:
    """The frontends after the first, as the first one starts, watches and stops them."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.count = settings.api_server_count - 1
        self._procs: list[BaseProcess] = []
        self._addresses: list[dict[str, Frontend]] = []
        self._stopping = False
        self._watcher: threading.Thread | None = None

    def start(self, models: Mapping[str, ServedModel]) -> None:
        """Start the others over the cores of `models` (their clients list every frontend's addresses)."""
        clients = {name: served.engine for name, served in models.items()}
        assert all(isinstance(c, EngineCoreClient) for c in clients.values()), "several frontends need core processes"
        self._addresses = [{name: cast(EngineCoreClient, c).frontends[i] for name, c in clients.items()}
                           for i in range(1, self.count + 1)]
        self._procs = [self._spawn(i) for i in range(self.count)]
        self._watcher = threading.Thread(target=self._watch, name="frontends", daemon=True)
        self._watcher.start()

    def _spawn(self, i: int) -> BaseProcess:
        context = multiprocessing.get_context("spawn")
        proc = context.Process(target=run_frontend, name=f"attnserve-frontend-{i + 1}", daemon=True,
                               args=(self.settings.model_dump_json(), i + 1, self._addresses[i]))
        proc.start()
        log.info("frontend started", extra={"frontend": i + 1, "frontend_pid": proc.pid})
        return proc

    def _watch(self) -> None:
        """A frontend that ends while the server runs is started again (its open streams are lost with it)."""
        while not self._stopping:
            wait([p.sentinel for p in self._procs], timeout=0.5)
            for i, proc in enumerate(self._procs):
                if proc.is_alive() or self._stopping:
                    continue
                log.error("frontend exited; starting it again", extra={"frontend": i + 1, "exit_code": proc.exitcode})
                if proc.pid is not None:
                    forget_process(proc.pid)
                self._procs[i] = self._spawn(i)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._procs if p.pid is not None]

    def signal(self, sig: int) -> None:
        """Pass a signal on: the first SIGTERM drains the others, a second stops them at once."""
        self._stopping = True
        for proc in self._procs:
            if proc.is_alive() and proc.pid is not None:
                os.kill(proc.pid, sig)

    def wait(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for proc in self._procs:
            proc.join(max(0.0, deadline - time.monotonic()))

    def stop(self, timeout: float) -> None:
        """Drain whichever frontend still runs (within `timeout`), then kill what is left."""
        if not self._stopping:
            self.signal(signal.SIGTERM)
        self.wait(timeout)
        for proc in self._procs:
            if proc.is_alive():
                proc.kill()
                proc.join(5)
            if proc.pid is not None:
                forget_process(proc.pid)
        if self._watcher is not None:
            self._watcher.join(2)


def run_frontend(settings_json: str, index: int, addresses: dict[str, Frontend]) -> None:
    """A frontend after the first: the app over cores it does not own, on the same port as the first."""
    import uvicorn

    from service.app import create_app
    from service.logs import log_config
    from service.server import DrainingServer, die_of

    threading.Thread(target=_end_with, args=(os.getppid(),), name="parent-watch", daemon=True).start()
    settings = Settings.model_validate_json(settings_json)
    app = create_app(settings)
    app.state.core_addresses = addresses
    app.state.frontend = index
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level,
                            log_config=log_config(settings.log_level,
                            settings.log_json), access_log=False, timeout_graceful_shutdown=5, lifespan="off")
    server = DrainingServer(config, settings)
    server.ignore_sigint = True

    def stop() -> None:  # the first frontend gave up its cores: it stops this one too
        server.should_exit = True

    app.state.on_fatal = stop
    server.run()
    if server.stopped_by is not None:
        die_of(server.stopped_by)
    sys.exit(0)


def _end_with(parent: int) -> None:
    """The first frontend gone (killed, so it could not stop this one): this one goes too."""
    fd = os.pidfd_open(parent)
    select.select([fd], [], [])
    os.kill(os.getpid(), signal.SIGKILL)

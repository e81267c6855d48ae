"""The HTTP server of a process: uvicorn with the service's drain on the first signal and a stop at once on the
second (`DrainingServer`), and the checks and exits around it."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import sys
from types import FrameType
from typing import NoReturn, Protocol, cast

import uvicorn
from fastapi import FastAPI

from service.app import drain_engines
from service.settings import Settings, SettingsError

log = logging.getLogger("attnserve.server")


class OtherFrontends(Protocol):
    """What this server asks of the frontends it started (service/frontends.py's `Frontends`)."""

    def signal(self, sig: int) -> None: ...

    def wait(self, timeout: float) -> None: ...


class DrainingServer(uvicorn.Server):
    """uvicorn, but the first SIGTERM/SIGINT drains the engines before the server stops, and a second one stops at
    once: `stopped_by` is then that signal, for the process to die of once the engines are stopped."""

    def __init__(self, config: uvicorn.Config, settings: Settings) -> None:
        super().__init__(config)
        self.app = cast(FastAPI, config.app)
        self.settings = settings
        self._draining = False
        self._drain_task: asyncio.Task[None] | None = None
        self.stopped_by: int | None = None
        self.engine_died = False  # an engine core died and --on-engine-death is exit
        self.ignore_sigint = False  # a frontend after the first: Ctrl-C reaches the first, which passes it on
        self.shared_port = settings.api_server_count > 1  # several frontends listen on the port

    @property
    def frontends(self) -> OtherFrontends | None:
        """The other frontends, where this process is the first of several (--api-server-count)."""
        return getattr(self.app.state, "frontends", None)

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        """Run the app's lifespan around uvicorn (not inside it), so that a model that cannot load ends the start
        with its own error instead of a lifespan traceback, and before the port opens."""
        async with self.app.router.lifespan_context(self.app):
            if self.shared_port and sockets is None:
                sockets = [shared_socket(self.config.host, self.config.port, self.config.backlog)]
            await super().serve(sockets)

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        """uvicorn's start, then "ready" in the log: the port listens now (with several frontends, a frontend
        started again logs it only once the kernel can hand it connections)."""
        await super().startup(sockets)
        if self.started:
            state = self.app.state
            log.info("ready", extra={"models": list(state.models), "default_model": state.default_model,
                                     "frontend": state.frontend})

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if not hasattr(self.config, "loaded_app"):
            return super().handle_exit(sig, frame)
        name = signal.Signals(sig).name
        if sig == signal.SIGINT and self.ignore_sigint:
            return None
        if self.frontends is not None:
            self.frontends.signal(signal.SIGTERM)  # the others drain (or stop) as this one does
        if self.stopped_by is not None:  # a third signal: the stop is under way
            return None
        if self._draining:
            # not passed on to uvicorn, which would re-raise it inside asyncio.run: a SIGINT there cancels the
            # lifespan's cleanup and ends in a KeyboardInterrupt traceback; main() dies of it after the cleanup
            log.warning("second signal: stopping now", extra={"signal": name})
            self.stopped_by = sig
            self.should_exit = self.force_exit = True
            return None
        self._draining = True
        extra = {"signal": name, "timeout_s": self.settings.drain_timeout}
        if sig == signal.SIGINT:  # a person at a terminal: tell them how not to wait
            log.info("draining: in-flight requests get up to %g s to finish; press Ctrl-C again to stop at once",
                     self.settings.drain_timeout, extra=extra)
        else:
            log.info("draining", extra=extra)
        asyncio.get_event_loop().call_soon_threadsafe(self._start_drain)  # from a signal handler: wakes the loop
        return None

    def _start_drain(self) -> None:
        self._drain_task = asyncio.get_running_loop().create_task(self._drain())  # kept: the loop holds tasks weakly

    async def _drain(self) -> None:
        await drain_engines(self.app, self.settings.drain_timeout)
        if self.frontends is not None:  # the engine cores serve them until they have drained too
            await asyncio.to_thread(self.frontends.wait, self.settings.drain_timeout + 5)
        await asyncio.sleep(0.2)  # let the last events of aborted streams go out
        self.should_exit = True


def shared_socket(host: str, port: int, backlog: int) -> socket.socket:
    """A listening socket that the other frontends bind as well (SO_REUSEPORT): the kernel spreads new connections
    over them by a hash of their addresses. (One socket shared by every process would hand a burst of connections
    to whichever process woke first: asyncio accepts all it finds.)"""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(backlog)
    return sock


def check_port(host: str, port: int) -> None:
    """Refuse at once a host:port this process cannot listen on (another server has it, or no such address),
    rather than after the models load, when uvicorn binds it. Each address the host resolves to is bound and
    released, as uvicorn will bind them."""
    try:
        for family, kind, proto, _, address in socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                                                   flags=socket.AI_PASSIVE):
            with socket.socket(family, kind, proto) as sock:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: a TIME_WAIT port is free
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)  # as asyncio binds each family
                sock.bind(address)
    except OSError as e:
        raise SettingsError(f"cannot listen on {host}:{port}: {e.strerror or e}; is another server using port "
                            f"{port}? Pick another with --port") from e


def die_of(sig: int) -> NoReturn:
    """End the process as killed by `sig` (exit status 128 + sig in a shell: 130 for Ctrl-C, 143 for SIGTERM),
    the convention that lets a calling script see the interruption, with no KeyboardInterrupt traceback."""
    logging.shutdown()  # flush the log lines before the signal ends the process
    signal.signal(sig, signal.SIG_DFL)
    os.kill(os.getpid(), sig)
    sys.exit(128 + sig)  # only where the signal did not end the process



"""The client of a frontend that shares another frontend's engine core (`--api-server-count` above 1).

The first frontend's `EngineCoreClient` owns the core process: it starts it, and restarts or abandons it when it
dies. Every other frontend binds its own pair of sockets, which the core connects to (service/engine/core.py), and
watches the core through a pidfd of its pid (the core is not its child). When the core dies, its streams end
with the same `engine_dead` error as the owner's and /ready is false; it then waits for the core the owner
starts again (its `Ready`), or for its own server to stop."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable

from service.engine import wire
from service.engine.client import CoreStartError, EngineCoreClient, Frontend
from service.engine.request import RequestStats, StepStats

log = logging.getLogger("attnserve.engine")


class AttachedCoreClient(EngineCoreClient):
    """A core another process owns, seen from one more frontend: the same interface as its owner's client."""

    def __init__(self, name: str, address: Frontend, backlog: int = 1024,
                 on_step: Callable[[StepStats], None] | None = None,
                 on_finish: Callable[[RequestStats], None] | None = None,
                 on_fatal: Callable[[str], None] | None = None) -> None:
        super().__init__(name, None, False, backlog, on_step, on_finish, on_fatal, address=address)
        self._pid: int | None = None
        self._pidfd = -1
        self._parent = os.getppid()

    def launch(self) -> None:
        """The owner starts the core."""

    def wait_ready(self, timeout: float = 900.0) -> wire.Ready:
        """The next `Ready` of a live core: the answer to a `Hello`, or the one a restarted core sends; batches of a
        core that died before it are dropped."""
        deadline, asked = time.monotonic() + timeout, float("-inf")
        while not self._closing:
            now = time.monotonic()
            if now > deadline:
                raise CoreStartError(f"the engine process for {self.name} was not ready after {timeout:g} s")
            if os.getppid() != self._parent:
                raise CoreStartError("the server that owns the engine processes has gone")
            if now - asked >= 1.0:  # ask (again: a core that is starting reads it once it runs)
                self._post(wire.Hello())
                asked = now
            if not self._in.poll(200):
                continue
            msg = wire.from_core.decode(self._in.recv())
            if isinstance(msg, wire.Ready) and self._watch(msg.pid):
                self.config = msg.config
                return msg
        raise CoreStartError("stopped")

    def _watch(self, pid: int) -> bool:
        if self._pidfd >= 0:
            os.close(self._pidfd)
            self._pidfd = -1
        try:
            self._pidfd = os.pidfd_open(pid)
        except ProcessLookupError:  # that core has died already: wait for the next
            return False
        self._pid = pid
        return True

    def _watched(self) -> int:
        return self._pidfd

    def _ended(self) -> str:
        return "the engine process exited"

    def _alive(self) -> bool:
        return self._pidfd >= 0

    def _recover(self) -> bool:
        try:
            self.wait_ready()
        except CoreStartError as e:
            if not self._closing and self.on_fatal is not None:
                self.on_fatal(str(e))
            return False
        self.dead = None
        log.warning("engine process back", extra={"model": self.name, "pid": self._pid})
        return True

    def stop(self) -> None:
        self._closing = True
        if self._reader is not None:
            self._reader.join(5)
        self._context.destroy(linger=0)
        if self._pidfd >= 0:
            os.close(self._pidfd)
            self._pidfd = -1

    @property
    def pid(self) -> int | None:
        return self._pid

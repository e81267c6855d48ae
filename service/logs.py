"""Structured logs: one JSON object per line, with whatever `extra` fields a call site adds."""

from __future__ import annotations

import json
import logging
import time
from typing import Any

_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        out.update({k: v for k, v in vars(record).items() if k not in _STANDARD})
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def setup_logging(level: str = "info", json_lines: bool = True) -> None:
    """Configure the attnserve loggers once (idempotent: tests create many apps)."""
    logger = logging.getLogger("attnserve")
    logger.setLevel(level.upper())
    if not any(getattr(h, "_attnserve", False) for h in logger.handlers):
        handler = logging.StreamHandler()
        handler._attnserve = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
        logger.propagate = False
    for h in logger.handlers:
        h.setFormatter(JsonFormatter() if json_lines else logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))

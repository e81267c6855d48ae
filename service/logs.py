"""Structured logs: one JSON object per line, with whatever `extra` fields a call site adds."""

from __future__ import annotations

import json
import logging
import time
from typing import Any

# uvicorn adds `color_message` (the message with ANSI colours) to its records: not a field for a JSON line
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime", "color_message"}
PLAIN = "%(asctime)s %(levelname)s %(name)s %(message)s"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "pid": record.process,  # a server may run several processes (engine cores, --api-server-count)
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
        h.setFormatter(JsonFormatter() if json_lines else logging.Formatter(PLAIN))


def log_config(level: str = "info", json_lines: bool = True) -> dict[str, Any]:
    """uvicorn's `log_config`: its loggers write the same lines as ours (JSON by default) to stderr."""
    formatter: dict[str, Any] = {"()": JsonFormatter} if json_lines else {"format": PLAIN}
    handler = {"class": "logging.StreamHandler", "formatter": "default", "stream": "ext://sys.stderr"}
    logger = {"handlers": ["default"], "level": level.upper(), "propagate": False}
    return {"version": 1, "disable_existing_loggers": False, "formatters": {"default": formatter},
            "handlers": {"default": handler}, "loggers": {"uvicorn": logger, "uvicorn.access": logger}}

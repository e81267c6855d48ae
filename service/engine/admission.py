"""What the engine refuses before it queues a request: whatever can never run, whatever the load."""

from __future__ import annotations

from typing import Protocol

from service.engine.request import (
    EngineConfig,
    EngineDead,
    EngineOverloaded,
    EngineStopped,
    InvalidRequest,
    Request,
    RequestTooLong,
)


class Engineish(Protocol):
    name: str
    dead: str | None
    accepting: bool


def refuse(engine: Engineish, config: EngineConfig, req: Request | None, pending: int, pending_tokens: int) -> None:
    """Refuse, before it is queued, a request (or, with req None, an inspection pass) that the engine cannot take:
    it is stopped or dead, the request can never run, or `pending` requests holding `pending_tokens` already
    wait (EngineOverloaded: HTTP 429)."""
    if engine.dead:
        raise EngineDead(f"engine for {engine.name} stopped: {engine.dead}")
    if not engine.accepting:
        raise EngineStopped("the server is shutting down")
    if req is not None:
        refuse_limits(req, config.max_model_len, config.num_blocks, config.block_size)
    if pending >= config.max_waiting_requests:
        raise EngineOverloaded(f"{pending} requests are waiting (limit {config.max_waiting_requests})")
    if req is not None and pending_tokens + req.num_tokens > config.max_waiting_tokens:
        raise EngineOverloaded(f"waiting prompts hold {pending_tokens} tokens (limit {config.max_waiting_tokens})")


def refuse_limits(req: Request, max_model_len: int, num_blocks: int, block_size: int) -> None:
    """Raise RequestTooLong / InvalidRequest for a request that does not fit the context or the KV pool."""
    total = req.num_tokens + req.params.max_tokens
    if total > max_model_len:
        raise RequestTooLong(
            f"this model's maximum context length is {max_model_len} tokens; the request needs "
            f"{total} ({req.num_tokens} in the prompt + max_tokens {req.params.max_tokens})"
        )
    if req.source_ids is not None and not req.source_ids:
        raise InvalidRequest("the prompt is empty; a translator needs a source sentence")
    if req.source_ids is not None and len(req.source_ids) > max_model_len:
        raise RequestTooLong(
            f"the source has {len(req.source_ids)} tokens; the maximum is {max_model_len}"
        )
    need = -(-total // block_size) - (-len(req.source_ids or []) // block_size)
    if need > num_blocks:
        raise RequestTooLong(
            f"the request needs {need} KV blocks and the pool has {num_blocks}; "
            "lower max_tokens or the prompt length"
        )

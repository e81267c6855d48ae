"""What the engine refuses before it queues a request: whatever can never run, whatever the load."""

from __future__ import annotations

from service.engine.blocks import BlockManager
from service.engine.request import InvalidRequest, Request, RequestTooLong


def refuse_limits(req: Request, max_model_len: int, blocks: BlockManager) -> None:
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
    need = blocks.blocks_for(total) + blocks.blocks_for(len(req.source_ids or []))
    if need > blocks.num_blocks:
        raise RequestTooLong(
            f"the request needs {need} KV blocks and the pool has {blocks.num_blocks}; "
            "lower max_tokens or the prompt length"
        )

"""vLLM's endpoints beside the OpenAI API: POST /tokenize and /detokenize, GET /tokenizer_info and /version (our
/v1/tokenize and /v1/detokenize keep their own shapes). Clients such as lm-evaluation-harness look for these."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from fastapi import APIRouter, Query, Request

from service.registry import ServedModel
from service.routes.deps import error_responses, served_model
from service.schemas.vllm import (
    TokenizerInfo,
    VersionResponse,
    VllmDetokenizeRequest,
    VllmDetokenizeResponse,
    VllmTokenizeRequest,
    VllmTokenizeResponse,
)
from service.serving.common import check_token_ids

router = APIRouter(tags=["vllm"])
ERRORS = error_responses(400, 401, 404)


def _token(served: ServedModel, token_id: int | None) -> str | None:
    return None if token_id is None else served.tokenizer.tok.id_to_token(token_id)


@router.post("/tokenize", response_model=VllmTokenizeResponse, responses=ERRORS)
async def tokenize(body: VllmTokenizeRequest, request: Request) -> VllmTokenizeResponse:
    """vLLM's tokenize: the prompt's token ids, their count and the context length (`return_token_strs` adds each
    token's text)."""
    served = served_model(request, body.model)
    ids = served.tokenizer.encode(body.prompt)
    strs = [served.tokenizer.token_text(i) for i in ids] if body.return_token_strs else None
    return VllmTokenizeResponse(count=len(ids), max_model_len=served.context_length, tokens=ids, token_strs=strs)


@router.post("/detokenize", response_model=VllmDetokenizeResponse, responses=ERRORS)
async def detokenize(body: VllmDetokenizeRequest, request: Request) -> VllmDetokenizeResponse:
    """vLLM's detokenize: token ids back to text (400 for an id outside the vocabulary)."""
    served = served_model(request, body.model)
    check_token_ids(served, body.tokens, "tokens")
    return VllmDetokenizeResponse(prompt=served.tokenizer.decode(body.tokens))


@router.get("/tokenizer_info", response_model=TokenizerInfo, responses=ERRORS)
async def tokenizer_info(request: Request, model: str | None = Query(None, description="default: the default model")
                         ) -> TokenizerInfo:
    """The tokenizer's special tokens (text and id), vocabulary size and context length, as vLLM describes them."""
    served = served_model(request, model)
    tok = served.tokenizer
    return TokenizerInfo(
        tokenizer_class="PreTrainedTokenizerFast", model=served.name,
        bos_token=_token(served, tok.bos_id), eos_token=_token(served, tok.eos_id),
        pad_token=_token(served, tok.pad_id), unk_token=_token(served, tok.unk_id),
        bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id, unk_token_id=tok.unk_id,
        vocab_size=tok.vocab_size, model_max_length=served.context_length)


@router.get("/version", response_model=VersionResponse)
async def server_version() -> VersionResponse:
    """The server's version."""
    try:
        return VersionResponse(version=version("attnserve"))
    except PackageNotFoundError:  # run from a source tree that was never installed
        return VersionResponse(version="unknown")

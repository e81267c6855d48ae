"""GET /v1/models (OpenAI's list, with architecture and sizes), GET /v1/models/{model}, tokenize, detokenize."""

from __future__ import annotations

from fastapi import APIRouter, Request

from service.inspection.selection import describe_attention
from service.registry import ServedModel
from service.routes.deps import error_responses, served_model, settings_of
from service.schemas.native import DetokenizeRequest, DetokenizeResponse, TokenizeRequest, TokenizeResponse
from service.schemas.openai import ModelCard, ModelList
from service.serving.chat_prompt import chat_capability
from service.serving.common import check_token_ids

router = APIRouter(tags=["models"])
ERRORS = error_responses(400, 401, 404)


def _card(request: Request, served: ServedModel) -> ModelCard:
    settings = settings_of(request)
    attention = describe_attention(served.checkpoint.config, settings.inspect_max_tokens, settings.inspect_max_values)
    return ModelCard(id=served.name, created=int(request.app.state.started), max_model_len=served.context_length,
                     details={**served.describe(), "attention": attention, "chat": chat_capability(served)})


@router.get("/v1/models", response_model=ModelList, responses=ERRORS)
async def list_models(request: Request) -> ModelList:
    """The served models in OpenAI's list shape; `details` carries architecture, sizes, context length
    (`context_length`) and what attention inspection offers."""
    models: dict[str, ServedModel] = request.app.state.models
    return ModelList(data=[_card(request, m) for m in models.values()])


@router.get("/v1/models/{model}", response_model=ModelCard, responses=ERRORS)
async def get_model(model: str, request: Request) -> ModelCard:
    """One served model's card (404 if no model has this name)."""
    return _card(request, served_model(request, model))


@router.post("/v1/tokenize", response_model=TokenizeResponse, responses=ERRORS)
async def tokenize(body: TokenizeRequest, request: Request) -> TokenizeResponse:
    """Text to the model's token ids, with each token's text."""
    served = served_model(request, body.model)
    ids = served.tokenizer.encode(body.text)
    return TokenizeResponse(model=served.name, tokens=ids, token_strings=[served.tokenizer.token_text(i) for i in ids],
                            count=len(ids))


@router.post("/v1/detokenize", response_model=DetokenizeResponse, responses=ERRORS)
async def detokenize(body: DetokenizeRequest, request: Request) -> DetokenizeResponse:
    """Token ids back to text (400 for an id outside the vocabulary)."""
    served = served_model(request, body.model)
    check_token_ids(served, body.tokens, "tokens")
    return DetokenizeResponse(model=served.name, text=served.tokenizer.decode(body.tokens))

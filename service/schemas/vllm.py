"""vLLM's server endpoints beside the OpenAI ones: /tokenize, /detokenize, /tokenizer_info, /version (the shapes
that lm-evaluation-harness and other vLLM clients read)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from service.schemas.common import MAX_TEXT_CHARS


class VllmTokenizeRequest(BaseModel):
    """Text to token ids, as vLLM's /tokenize takes it (the completion form)."""

    model_config = ConfigDict(extra="forbid", str_max_length=MAX_TEXT_CHARS, json_schema_extra={
        "examples": [{"model": "shakespeare-gpt", "prompt": "ROMEO:", "return_token_strs": True}]})
    model: str | None = Field(None, description="a served model's name; the default model if omitted")
    prompt: str
    add_special_tokens: bool | None = Field(True, description="accepted; this tokenizer adds no special tokens")
    return_token_strs: bool | None = Field(False, description="also return each token's text")


class VllmTokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class VllmDetokenizeRequest(BaseModel):
    """Token ids back to text, as vLLM's /detokenize takes them."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={
        "examples": [{"model": "shakespeare-gpt", "tokens": [34, 31, 29, 21, 31, 14]}]})
    model: str | None = Field(None, description="a served model's name; the default model if omitted")
    tokens: list[int]


class VllmDetokenizeResponse(BaseModel):
    prompt: str


class TokenizerInfo(BaseModel):
    """What a client needs to tokenize as the server does: the special tokens and the context length."""

    model_config = ConfigDict(extra="allow")
    tokenizer_class: str
    model: str
    bos_token: str | None = None
    eos_token: str | None = None
    pad_token: str | None = None
    unk_token: str | None = None
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    unk_token_id: int | None = None
    vocab_size: int
    model_max_length: int
    add_bos_token: bool = False
    add_eos_token: bool = False
    chat_template: str | None = None


class VersionResponse(BaseModel):
    version: str

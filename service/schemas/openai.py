"""OpenAI-compatible surfaces: /v1/completions and the /v1/models list."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from service.schemas.common import ConstraintFields, SamplingFields, Usage


class StreamOptions(BaseModel):
    include_usage: bool = False


# vLLM's extra fields that this server cannot honour, with the value that asks for nothing: a request that sends
# one of these values passes, any other value is refused with a 400 naming the field
UNSUPPORTED: dict[str, object] = {
    "best_of": None, "suffix": "", "logit_bias": {}, "skip_special_tokens": True, "truncate_prompt_tokens": None, "allowed_token_ids": None, "bad_words": [],
    "spaces_between_special_tokens": True, "return_tokens_as_token_ids": False, "logits_processors": None,
    "priority": 0,
}


class CompletionRequest(SamplingFields, ConstraintFields):
    """OpenAI's /v1/completions request, plus vLLM's sampling extras (top_k, min_p, min_tokens, repetition_penalty,
    ignore_eos, stop_token_ids, include_stop_str_in_output, prompt_logprobs) and beam search (use_beam_search, n,
    length_penalty). Every field but prompt may be null."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [
            {"model": "shakespeare-gpt", "prompt": "ROMEO:", "max_tokens": 32},
            {"model": "multi30k-en-de", "prompt": "A man rides a bike.", "temperature": 0},
            {"model": "shakespeare-gpt", "prompt": "ROMEO: But soft", "max_tokens": 0, "echo": True, "logprobs": 1},
            {"model": "multi30k-en-de", "prompt": "A man rides a bike.", "use_beam_search": True, "n": 4},
        ]},
    )

    prompt: str | list[str] | list[int] | list[list[int]] = Field(..., description="text, texts or token ids")
    max_tokens: int = Field(16, ge=0, description="tokens to generate at most (omitted: 16, capped to the room left "
                            "in the context); 0 with echo scores the prompt without generating")
    n: int = Field(1, ge=1)
    logprobs: int | None = Field(None, ge=0, le=20, description="log-probs of the chosen tokens and the top N; with "
                                 "echo, of the prompt's tokens too (the first one's is null)")
    echo: bool = Field(False, description="return the prompt before the completion")
    prompt_logprobs: int | None = Field(None, ge=0, description="vLLM: each prompt token's log-prob and the top N "
                                        "at its position, in the choice's prompt_logprobs")
    stream_options: StreamOptions | None = None
    user: str | None = None
    add_special_tokens: bool = Field(True, description="vLLM: accepted; this tokenizer adds no special tokens")
    # refused unless they ask for nothing (UNSUPPORTED)
    best_of: int | None = Field(None, ge=1, description="only equal to n")
    suffix: str | None = None
    logit_bias: dict[str, float] | None = None
    skip_special_tokens: bool = True
    use_beam_search: bool = Field(False, description="vLLM: beam search of width n; choices best first")
    length_penalty: float | None = Field(None, description="with use_beam_search: alpha of the GNMT length penalty "
                                         "((5 + length) / 6) ** alpha that divides a hypothesis's log-prob "
                                         "(default 0.6, the paper's)")
    truncate_prompt_tokens: int | None = None
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    spaces_between_special_tokens: bool = True
    return_tokens_as_token_ids: bool = False
    logits_processors: list[Any] | None = None
    priority: int = 0

    def unsupported(self) -> str | None:
        """The first field set to something this server cannot do (best_of equal to n is only n)."""
        for name, harmless in UNSUPPORTED.items():
            value = getattr(self, name)
            if value is not None and value != harmless and not (name == "best_of" and value == self.n):
                return name
        return None


class CompletionLogprobs(BaseModel):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class PromptTokenLogprob(BaseModel):
    """vLLM's entry for one token at one prompt position; rank is 1 for the most likely token (null: not in the
    top N asked for)."""

    logprob: float
    rank: int | None = None
    decoded_token: str


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    prompt_logprobs: list[dict[str, PromptTokenLogprob] | None] | None = Field(
        None, description="vLLM: per prompt token (the first is null), token id -> its log-prob")


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "attnserve"
    max_model_len: int | None = Field(None, description="the context length (vLLM's field)")
    details: dict[str, Any] = Field(default_factory=dict)


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]

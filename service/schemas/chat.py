"""OpenAI's /v1/chat/completions: the request (with vLLM's extra sampling fields), the response and its logprobs.

Every optional field accepts null, as OpenAI's does (clients send `"temperature": null`); a null means the
default. Fields we cannot honour are declared so that the route can refuse them by name (`UNSUPPORTED`)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from service.schemas.common import MAX_TEXT_CHARS, ConstraintFields, Sampling, Usage


class ChatMessage(BaseModel):
    """One message; `content` is text or a list of content parts (only `text` parts are accepted)."""

    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    refusal: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None
    function_call: dict[str, Any] | None = None
    audio: dict[str, Any] | None = None


# Request fields that ask for something we cannot do: refused by name unless null, empty or the harmless value.
UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "functions": (), "function_call": ("none",), "audio": (),
    "prediction": (), "web_search_options": (), "logit_bias": (), "modalities": (["text"],),
    # vLLM's
    "best_of": (1,), "use_beam_search": (False,), "length_penalty": (1.0,), "skip_special_tokens": (True,),
    "spaces_between_special_tokens": (True,), "echo": (False,), "return_tokens_as_token_ids": (False,),
    "truncate_prompt_tokens": (), "allowed_token_ids": (), "bad_words": (), "logits_processors": (),
    "chat_template": (), "documents": (), "priority": (0,),
}


class ChatStreamOptions(BaseModel):
    include_usage: bool | None = False
    continuous_usage_stats: bool | None = Field(False, description="vLLM: usage so far on every chunk too")


class ChatCompletionRequest(ConstraintFields):
    """OpenAI's chat request, plus vLLM's top_k, min_p, repetition_penalty, ignore_eos, stop_token_ids,
    min_tokens, include_stop_str_in_output and chat-template switches."""

    model_config = ConfigDict(
        extra="forbid", str_max_length=MAX_TEXT_CHARS,
        json_schema_extra={"examples": [
            {"model": "shakespeare-gpt", "messages": [{"role": "user", "content": "ROMEO:"}], "max_tokens": 32},
            {"model": "multi30k-en-de", "messages": [{"role": "user", "content": "A man rides a bike."}],
             "temperature": 0},
        ]},
    )

    messages: list[ChatMessage] = Field(..., min_length=1)
    model: str | None = Field(None, description="a served model's name; the default model if omitted")
    stream: bool | None = False
    stream_options: ChatStreamOptions | None = None
    n: int | None = Field(1, ge=1)
    max_tokens: int | None = Field(None, ge=1, description="deprecated by OpenAI for max_completion_tokens")
    max_completion_tokens: int | None = Field(None, ge=1, description="default: the room left in the context")
    temperature: float | None = Field(None, ge=0.0, le=2.0, description="default 1, or 0 (greedy) for a translator")
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    stop: str | list[str] | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    user: str | None = None
    store: bool | None = None
    metadata: dict[str, str] | None = None
    service_tier: str | None = None
    parallel_tool_calls: bool | None = None
    tools: list[dict[str, Any]] | None = Field(None, description="functions the reply may call (with tool_choice "
                                               "'required' or a named function: service/routes/chat_tools.py)")
    tool_choice: str | dict[str, Any] | None = None
    # refused unless harmless (UNSUPPORTED)
    functions: list[dict[str, Any]] | None = None
    function_call: str | dict[str, Any] | None = None
    audio: dict[str, Any] | None = None
    modalities: list[str] | None = None
    prediction: dict[str, Any] | None = None
    web_search_options: dict[str, Any] | None = None
    logit_bias: dict[str, float] | None = None
    best_of: int | None = None
    use_beam_search: bool | None = None
    length_penalty: float | None = None
    skip_special_tokens: bool | None = None
    spaces_between_special_tokens: bool | None = None
    echo: bool | None = None
    return_tokens_as_token_ids: bool | None = None
    truncate_prompt_tokens: int | None = None
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    logits_processors: list[Any] | None = None
    chat_template: str | None = Field(None, description="refused: only the checkpoint's template is rendered")
    documents: list[dict[str, Any]] | None = None
    priority: int | None = None
    # vLLM's extras we honour
    top_k: int | None = Field(None, ge=-1, description="0 or -1 disables top-k")
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(None, ge=0.01, le=10.0)
    ignore_eos: bool | None = None
    stop_token_ids: list[int] | None = None
    min_tokens: int | None = Field(None, ge=0, description="tokens before EOS or a stop may end the reply")
    include_stop_str_in_output: bool | None = None
    add_generation_prompt: bool | None = Field(True, description="end the prompt where the assistant speaks")
    continue_final_message: bool | None = Field(False, description="continue the last (assistant) message")
    chat_template_kwargs: dict[str, Any] | None = Field(None, description="extra variables for the template")

    def sampling(self) -> Sampling:
        """The shared sampling fields, with nulls left at their defaults (so an omitted max_tokens stays unset)."""
        values: dict[str, Any] = {k: getattr(self, k) for k in Sampling.model_fields}
        values["max_tokens"] = self.max_completion_tokens or self.max_tokens
        return Sampling(**{k: v for k, v in values.items() if v is not None})


class ChatTopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(ChatTopLogprob):
    top_logprobs: list[ChatTopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None = None
    refusal: list[ChatTokenLogprob] | None = None


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    refusal: str | None = None
    tool_calls: list[dict[str, Any]] | None = None


class ChatChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionResponse(BaseModel):
    """The whole reply; streamed, each SSE chunk is `chat.completion.chunk` with `delta` in place of `message`."""

    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None

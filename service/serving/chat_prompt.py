"""Chat messages to the prompt a model reads: refuse what we cannot honour (by field name), flatten text content
parts, render the checkpoint's chat template (or the plain default) for an LM, or take the last user message as a
translator's source."""

from __future__ import annotations

from typing import Any

from service.chat_template import ChatTemplate, ChatTemplateError, embedded_chat_template, load_chat_template
from service.errors import APIError
from service.registry import ServedModel
from service.schemas.chat import UNSUPPORTED, ChatCompletionRequest


def check_supported(body: ChatCompletionRequest) -> None:
    """A 400 naming the first field that asks for tools, audio, structured output or anything else we lack."""
    for name, harmless in UNSUPPORTED.items():
        value = getattr(body, name)
        if value not in (None, [], {}) and value not in harmless:
            raise APIError(400, f"{name} is not supported by this server", param=name, code="unsupported_parameter")
    for i, m in enumerate(body.messages):
        for name in ("function_call", "audio"):
            if getattr(m, name):
                raise APIError(400, f"messages.{i}.{name} is not supported by this server",
                               param=f"messages.{i}.{name}")
        if m.role == "function":
            raise APIError(400, f"messages.{i}.role 'function' is not supported (OpenAI's older form: use 'tool')",
                           param=f"messages.{i}.role")


def _text(content: str | list[dict[str, Any]] | None, where: str) -> str:
    """A message's text: a string, or its text parts joined (image, audio and file parts are refused)."""
    if content is None or isinstance(content, str):
        return content or ""
    parts: list[str] = []
    for j, part in enumerate(content):
        kind = part.get("type")
        if kind != "text" or not isinstance(part.get("text"), str):
            raise APIError(400, f"{where}.content.{j}: content parts of type {kind!r} are not supported; only text",
                           param=f"{where}.content.{j}")
        parts.append(part["text"])
    return "\n".join(parts)


def messages_of(body: ChatCompletionRequest) -> list[dict[str, Any]]:
    """The messages as plain dicts with string content, as HF chat templates expect them."""
    out: list[dict[str, Any]] = []
    for i, m in enumerate(body.messages):
        msg: dict[str, Any] = {"role": m.role, "content": _text(m.content, f"messages.{i}")}
        for key in ("name", "tool_calls", "tool_call_id"):  # an assistant's calls and their results, for templates
            if getattr(m, key) is not None:
                msg[key] = getattr(m, key)
        out.append(msg)
    return out


def template_of(served: ServedModel) -> ChatTemplate:
    tok = served.tokenizer
    embedded = served.checkpoint.chat_template
    if embedded is not None:
        return embedded_chat_template(embedded, tok.specials.bos, tok.specials.eos)
    return load_chat_template(served.checkpoint.path, tok.specials.bos, tok.specials.eos)


def chat_capability(served: ServedModel) -> dict[str, Any]:
    """What /v1/models says about chat: available, and how messages become a prompt."""
    if served.is_encoder_decoder:
        return {"available": True, "prompt": "translates the last user message"}
    try:
        return {"available": True, "prompt": f"{template_of(served).source} chat template"}
    except ChatTemplateError as e:
        return {"available": False, "error": str(e)}


def chat_prompt(served: ServedModel, body: ChatCompletionRequest, tools: list[dict[str, Any]] | None = None
                ) -> tuple[str, list[int]]:
    """(prompt text, its token ids). The rendered template is tokenized without adding specials: the template
    writes the BOS it wants, as Hugging Face does. `tools` reach the template as Hugging Face passes them."""
    messages = messages_of(body)
    if served.is_encoder_decoder:
        users = [m["content"] for m in messages if m["role"] == "user"]
        if not users:
            raise APIError(400, "a translator needs a user message to translate", param="messages")
        return users[-1], served.tokenizer.encode(users[-1])
    try:
        template = template_of(served)
    except ChatTemplateError as e:
        raise APIError(500, f"model {served.name}: {e}", "server_error") from e
    extra = dict(body.chat_template_kwargs or {})
    if tools:
        extra["tools"] = tools
    if body.continue_final_message:
        if body.add_generation_prompt and "add_generation_prompt" in body.model_fields_set:
            raise APIError(400, "continue_final_message and add_generation_prompt cannot both be true",
                           param="continue_final_message")
        if messages[-1]["role"] != "assistant":
            raise APIError(400, "continue_final_message needs an assistant message last", param="messages")
        text = template.render(messages, False, extra)
        final = messages[-1]["content"].strip()
        cut = text.rfind(final) if final else -1
        if cut >= 0:  # end the prompt where the final message ends (drop the template's end-of-turn)
            text = text[: cut + len(final)]
    else:
        text = template.render(messages, body.add_generation_prompt is not False, extra)
    return text, served.tokenizer.encode(text)

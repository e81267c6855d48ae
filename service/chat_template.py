"""Chat messages to one prompt, as Hugging Face does it: the Jinja `chat_template` a checkpoint declares in
`tokenizer_config.json` (or `chat_template.jinja`), rendered in a sandbox with HF's variables (`messages`,
`add_generation_prompt`, `bos_token`, `eos_token`, the other special tokens, `raise_exception`, `strftime_now`);
a GGUF file carries its template in its metadata instead.

A checkpoint without a template gets `DEFAULT_TEMPLATE`: one "role: content" line per message, then
"assistant:" when a reply is wanted. A translator has no template: it translates the last user message."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

# The plain default: "system: Be brief.\nuser: Hi\nassistant:" (the model continues after the colon).
DEFAULT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


class ChatTemplateError(ValueError):
    """The template refused the conversation (its `raise_exception`) or failed to render it."""


def _raise_exception(message: str) -> None:
    raise TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    """HF's `tojson` filter: JSON without HTML escaping (Jinja's own escapes <, >, & and ')."""
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


@dataclass(frozen=True)
class ChatTemplate:
    """A compiled template and the special tokens it may name; `source` says where it came from."""

    source: str  # "checkpoint" or "default"
    text: str
    special_tokens: tuple[tuple[str, str | None], ...]

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
               extra: dict[str, Any] | None = None) -> str:
        variables = {**dict(self.special_tokens), **(extra or {}), "messages": messages,
                     "add_generation_prompt": add_generation_prompt}
        try:
            return _compiled(self.text).render(**variables)
        except TemplateError as e:
            raise ChatTemplateError(f"the chat template refused the messages: {e}") from e


@lru_cache(maxsize=64)
def _compiled(text: str) -> Any:
    return _environment().from_string(text)


def _declared(config: dict[str, Any], folder: Path) -> str | None:
    """The template text, from tokenizer_config.json (a string, or HF's list of named ones) or chat_template.jinja."""
    template = config.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if isinstance(template, str) and template:
        return template
    file = folder / "chat_template.jinja"
    return file.read_text() if file.is_file() else None


@lru_cache(maxsize=64)
def embedded_chat_template(text: str, bos_token: str | None, eos_token: str | None) -> ChatTemplate:
    """A template carried inside the weights file (GGUF's tokenizer.chat_template), compiled once."""
    try:
        _compiled(text)
    except TemplateError as e:
        raise ChatTemplateError(f"the model file's chat_template does not parse: {e}") from e
    return ChatTemplate("checkpoint", text, (("bos_token", bos_token), ("eos_token", eos_token)))


@lru_cache(maxsize=64)
def load_chat_template(folder: Path, bos_token: str | None, eos_token: str | None) -> ChatTemplate:
    """The checkpoint's template (compiled once; a syntax error stops here, at load), or the plain default.
    `bos_token`/`eos_token` are the tokenizer's, used where tokenizer_config.json does not name them."""
    file = folder / "tokenizer_config.json"
    config: dict[str, Any] = {}
    if file.is_file():
        try:
            loaded = json.loads(file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ChatTemplateError(f"{file.name} is not valid JSON ({e})") from e
        config = loaded if isinstance(loaded, dict) else {}
    specials: dict[str, str | None] = {"bos_token": bos_token, "eos_token": eos_token}
    for name in ("bos_token", "eos_token", "pad_token", "unk_token"):
        if name in config:
            specials[name] = _token_text(config[name])
    text = _declared(config, folder)
    source = "checkpoint" if text is not None else "default"
    text = text if text is not None else DEFAULT_TEMPLATE
    try:
        _compiled(text)  # a template that does not parse fails here, not in the middle of a request
    except TemplateError as e:
        raise ChatTemplateError(f"the checkpoint's chat_template does not parse: {e}") from e
    return ChatTemplate(source, text, tuple(specials.items()))

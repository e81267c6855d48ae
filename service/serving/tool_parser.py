"""tool_choice "auto": the model decides, writing its calls in the format its chat template teaches it. The one
format read here is Hermes' (`<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, also Qwen2.5's and
SmolLM3's templates' and vLLM's `hermes` parser's): a template that declares tools and writes `<tool_call>` gets
this parser; one that declares tools in another format is refused (service/routes/chat_tools.py)."""

from __future__ import annotations

import json
import re
from typing import Any

START, END = "<tool_call>", "</tool_call>"
_CALL = re.compile(re.escape(START) + r"\s*(.*?)\s*" + re.escape(END), re.S)


def declares_hermes(template_text: str) -> bool:
    """The chat template renders `tools` and teaches the <tool_call> format."""
    return "tools" in template_text and START in template_text


def _call(body: str) -> tuple[str, str] | None:
    """(name, arguments JSON) of one call's body, or None when it is not a call."""
    try:
        item = json.loads(body)
    except json.JSONDecodeError:
        return None
    if not isinstance(item, dict) or not isinstance(item.get("name"), str):
        return None
    arguments = item.get("arguments", item.get("parameters", {}))
    return item["name"], arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)


def parse(text: str) -> tuple[str | None, list[tuple[str, str]]]:
    """(the content outside the calls or None, [(name, arguments)]); text without a whole call is all content."""
    calls = [c for body in _CALL.findall(text) if (c := _call(body)) is not None]
    if not calls:
        return text, []
    content = text[: text.index(START)].strip()
    return content or None, calls


class HermesDeltas:
    """Streamed: content deltas as they come, except text that may be the start of a <tool_call> (held back until
    it is known); from the first call on, each call whole when its </tool_call> arrives."""

    def __init__(self) -> None:
        self.buffer = ""
        self.in_calls = False
        self.count = 0

    def feed(self, text: str, final: bool = False) -> list[tuple[str, Any]]:
        """[("content", text) | ("call", (index, name, arguments))] for this delta."""
        self.buffer += text
        out: list[tuple[str, Any]] = []
        if not self.in_calls:
            at = self.buffer.find(START)
            if at < 0:
                keep = 0 if final else _partial_start(self.buffer)
                cut = len(self.buffer) - keep
                if cut:
                    out.append(("content", self.buffer[:cut]))
                self.buffer = self.buffer[cut:]
                return out
            if self.buffer[:at].strip():
                out.append(("content", self.buffer[:at]))
            self.buffer, self.in_calls = self.buffer[at:], True
        while (m := _CALL.search(self.buffer)) is not None:
            call = _call(m.group(1))
            if call is not None:
                out.append(("call", (self.count, *call)))
                self.count += 1
            self.buffer = self.buffer[m.end() :]
        return out


def _partial_start(text: str) -> int:
    """How many of text's last characters could begin START."""
    for n in range(min(len(START) - 1, len(text)), 0, -1):
        if START.startswith(text[-n:]):
            return n
    return 0

"""Tool calls on /v1/chat/completions: `tools` with `tool_choice` "required" or a named function. The output is
held to JSON by a constraint (service/routes/constraints.py does the same for response_format):

- a named function: the output is its arguments, under its `parameters` schema; one call, finish_reason "stop"
  (as OpenAI answers a forced function);
- "required": the output is a JSON array of {"name", "arguments"} objects, each one of the tools with its
  schema (one call only when parallel_tool_calls is false); finish_reason "tool_calls".

"auto" (OpenAI's default when tools are given) lets the model decide, in the format its chat template teaches:
a template that renders `tools` and writes `<tool_call>` gets the Hermes parser (service/routes/tool_parser.py);
for any other template "auto" is a 400 that says to use "required" or a named function. "none" generates text and
calls nothing (the tools still reach the template)."""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from service.chat_template import ChatTemplateError
from service.engine.request import Constraint
from service.errors import APIError
from service.registry import ServedModel
from service.schemas.chat import ChatCompletionRequest
from service.serving.chat_prompt import template_of
from service.serving.tool_parser import HermesDeltas, declares_hermes, parse

NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # OpenAI's rule for function names
MAX_TOOLS = 128


@dataclass
class ToolPlan:
    """What the request asks of tools: mode "none", "named" (name) or "required"; the output's constraint."""

    mode: str = "none"
    name: str | None = None
    constraint: Constraint | None = None
    tools: list[dict[str, Any]] = field(default_factory=list)  # as the chat template receives them


def _functions(tools: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """name -> parameters schema, each tool checked (a 400 naming tools.i.<field>)."""
    if len(tools) > MAX_TOOLS:
        raise APIError(400, f"tools has {len(tools)} entries; the limit is {MAX_TOOLS}", param="tools")
    out: dict[str, dict[str, Any]] = {}
    for i, tool in enumerate(tools):
        fn = tool.get("function")
        if tool.get("type") != "function" or not isinstance(fn, dict):
            raise APIError(400, f"tools.{i}: only {{'type': 'function', 'function': {{...}}}} tools are supported",
                           param=f"tools.{i}.type")
        name = fn.get("name")
        if not isinstance(name, str) or not NAME.match(name):
            raise APIError(400, f"tools.{i}.function.name must match {NAME.pattern}", param=f"tools.{i}.function.name")
        if name in out:
            raise APIError(400, f"tools.{i}.function.name {name!r} is given twice", param=f"tools.{i}.function.name")
        params = fn.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(params, dict):
            raise APIError(400, f"tools.{i}.function.parameters must be a JSON schema object",
                           param=f"tools.{i}.function.parameters")
        out[name] = params
    return out


def plan_tools(body: ChatCompletionRequest, served: ServedModel) -> ToolPlan:
    choice = body.tool_choice
    if not body.tools:
        if choice not in (None, "none"):
            raise APIError(400, "tool_choice needs tools", param="tool_choice")
        return ToolPlan()
    functions = _functions(body.tools)
    if choice == "none":
        return ToolPlan(tools=body.tools)
    if choice in (None, "auto"):
        if not _template_declares_hermes(served):
            raise APIError(400, "tool_choice 'auto' (the default with tools) needs a chat template that declares "
                           "tools in a format we parse (Hermes' <tool_call>); this model's does not: use tool_choice "
                           "'required' or {'type': 'function', 'function': {'name': ...}}", param="tool_choice")
        return ToolPlan("auto", tools=body.tools)
    if choice == "required":
        calls = [{"type": "object", "properties": {"name": {"const": name}, "arguments": schema},
                  "required": ["name", "arguments"]} for name, schema in functions.items()]
        array: dict[str, Any] = {"type": "array", "items": {"anyOf": calls}, "minItems": 1}
        if body.parallel_tool_calls is False:
            array["maxItems"] = 1
        return ToolPlan("required", None, Constraint("json", json.dumps(array)), body.tools)
    name = choice.get("function", {}).get("name") if isinstance(choice, dict) else None
    if name is None:
        raise APIError(400, "tool_choice must be 'none', 'auto', 'required' or {'type': 'function', 'function': "
                       "{'name': ...}}", param="tool_choice")
    if name not in functions:
        raise APIError(400, f"tool_choice names {name!r}, which is not among tools: {sorted(functions)}",
                       param="tool_choice.function.name")
    return ToolPlan("named", name, Constraint("json", json.dumps(functions[name])), body.tools)


def _template_declares_hermes(served: ServedModel) -> bool:
    if served.is_encoder_decoder:
        return False
    try:
        return declares_hermes(template_of(served).text)
    except ChatTemplateError:
        return False


def call(name: str, arguments: str, index: int | None = None) -> dict[str, Any]:
    """One entry of message.tool_calls (with `index`, the first delta of a streamed one)."""
    entry = {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
             "function": {"name": name, "arguments": arguments}}
    return entry if index is None else {"index": index, **entry}


def tool_calls(plan: ToolPlan, text: str) -> list[dict[str, Any]] | None:
    """The finished output's calls; None when it is not a whole call (cut off by max_tokens)."""
    if plan.mode == "named":
        assert plan.name is not None
        return [call(plan.name, text)]
    if plan.mode == "auto":
        return [call(name, arguments) for name, arguments in parse(text)[1]] or None
    try:
        items = json.loads(text)
    except json.JSONDecodeError:
        return None
    return [call(item["name"], json.dumps(item["arguments"], ensure_ascii=False)) for item in items]


def reply(plan: ToolPlan, text: str, finish: str | None) -> tuple[str | None, list[dict[str, Any]] | None, str | None]:
    """The finished reply: (content, tool_calls, finish_reason). Calls come with finish_reason "tool_calls" where
    the model chose to call ("required", "auto"); a forced function keeps "stop", as OpenAI answers."""
    calls = tool_calls(plan, text) if plan.mode != "none" and finish != "length" else None
    if calls is None:
        return text, None, finish
    content = parse(text)[0] if plan.mode == "auto" else None
    return content, calls, "tool_calls" if plan.mode != "named" and finish == "stop" else finish


class CallDeltas:
    """A streamed reply's deltas, as OpenAI streams calls: the first delta of a call carries its index, id, type,
    name and empty arguments, later ones argument text. A named call streams its arguments as they are generated;
    a "required" array's calls are each sent whole when its object closes, and so are "auto"'s when their
    </tool_call> arrives (text before the first call streams as content)."""

    def __init__(self, plan: ToolPlan) -> None:
        self.plan = plan
        self.started = False
        self.count = 0
        self._item: list[str] = []
        self._depth, self._in_string, self._escaped = 0, False, False
        self._hermes = HermesDeltas() if plan.mode == "auto" else None

    def feed(self, text: str, final: bool = False) -> list[dict[str, Any]]:
        """The deltas ({"content": ...} or {"tool_calls": [...]}) this text gives."""
        if self._hermes is not None:
            out = []
            for kind, value in self._hermes.feed(text, final):
                if kind == "content":
                    out.append({"content": value})
                else:
                    out.append({"tool_calls": [call(value[1], value[2], value[0])]})
            self.count = self._hermes.count
            return out
        if self.plan.mode == "named":
            assert self.plan.name is not None
            out = [] if self.started else [{"tool_calls": [call(self.plan.name, "", 0)]}]
            self.started = True
            if text:
                out.append({"tool_calls": [{"index": 0, "function": {"arguments": text}}]})
            return out
        return [{"tool_calls": [d]} for ch in text if (d := self._char(ch)) is not None]

    def finish(self, reason: str | None) -> str | None:
        called = self.plan.mode == "required" or (self.plan.mode == "auto" and self.count > 0)
        return "tool_calls" if called and reason == "stop" else reason

    def _char(self, ch: str) -> dict[str, Any] | None:
        """Follow the array one character at a time; a call's delta when a top-level object closes."""
        if self._depth >= 2:
            self._item.append(ch)
        if self._in_string:
            if self._escaped:
                self._escaped = False
            elif ch == "\\":
                self._escaped = True
            elif ch == '"':
                self._in_string = False
            return None
        if ch == '"':
            self._in_string = True
        elif ch in "[{":
            self._depth += 1
            if self._depth == 2:
                self._item = [ch]
        elif ch in "]}":
            self._depth -= 1
            if self._depth == 1:
                item = json.loads("".join(self._item))
                self.count += 1
                return call(item["name"], json.dumps(item["arguments"], ensure_ascii=False), self.count - 1)
        return None

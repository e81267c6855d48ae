"""The Hermes tool-call parser (tool_choice "auto"): whole replies and streamed deltas, a <tool_call> split across
deltas held back until it is known, text that only looks like one let through."""

from __future__ import annotations

import json

from service.serving.tool_parser import HermesDeltas, declares_hermes, parse

CALL = '<tool_call>\n{"name": "f", "arguments": {"x": 1}}\n</tool_call>'


def test_parse_splits_content_and_calls() -> None:
    assert parse("just text") == ("just text", [])
    assert parse(f"Let me look. {CALL}{CALL}") == ("Let me look.", [("f", '{"x": 1}'), ("f", '{"x": 1}')])
    assert parse("<tool_call>not json</tool_call>") == ("<tool_call>not json</tool_call>", [])
    assert parse('<tool_call>{"name": "g", "parameters": "{}"}</tool_call>') == (None, [("g", "{}")])


def test_streamed_deltas_equal_the_whole_parse_however_the_text_is_cut() -> None:
    text = f"Let me look. {CALL} and {CALL}"
    for size in (1, 2, 3, 7, 11, len(text)):
        d = HermesDeltas()
        pieces = [text[i : i + size] for i in range(0, len(text), size)]
        out = [x for i, p in enumerate(pieces) for x in d.feed(p, final=i == len(pieces) - 1)]
        content = "".join(v for k, v in out if k == "content")
        calls = [(name, json.loads(args)) for k, (_, name, args) in ((k, v) for k, v in out if k == "call")]
        assert content == "Let me look. " and calls == [("f", {"x": 1})] * 2, (size, out)


def test_text_that_only_starts_like_a_call_is_content() -> None:
    d = HermesDeltas()
    assert d.feed("a <tool") == [("content", "a ")]
    assert d.feed("box> b", final=True) == [("content", "<toolbox> b")]


def test_templates_that_declare_hermes_calls() -> None:
    assert declares_hermes("{% if tools %}...<tool_call>{% endif %}")
    assert not declares_hermes("{% for m in messages %}{{ m.content }}{% endfor %}")

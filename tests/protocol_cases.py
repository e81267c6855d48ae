"""Requests over the protocol's surfaces whose answers two servers must give alike (an engine core process and the
in-process engine, one HTTP frontend and several), and how to compare the answers: ids and times aside, floats
within 0.02."""

from __future__ import annotations

import json
import re
from typing import Any

COMPARED: list[tuple[str, dict[str, Any]]] = [
    ("/v1/completions", {"model": "tiny-gpt", "prompt": ["ROMEO:", "JULIET: O"], "max_tokens": 12,
                         "temperature": 0, "logprobs": 2, "echo": True, "n": 2, "stop": ["e"]}),
    ("/v1/completions", {"model": "tiny-gpt", "prompt": "But soft", "max_tokens": 9, "temperature": 0,
                         "prompt_logprobs": 1}),
    ("/v1/chat/completions", {"model": "tiny-gpt", "messages": [{"role": "user", "content": "Romeo?"}],
                              "max_tokens": 10, "temperature": 0, "logprobs": True, "top_logprobs": 2}),
    ("/v1/completions", {"model": "tiny-mt", "prompt": "Two dogs play in the snow.", "max_tokens": 8,
                         "temperature": 0, "use_beam_search": True, "n": 2}),
    ("/v1/generate", {"model": "tiny-gpt", "prompt": "ROMEO: But", "max_tokens": 10, "temperature": 0,
                      "return_attention": {"layers": [0], "aggregation": "max"}}),
    ("/v1/generate", {"model": "tiny-mt", "prompt": "A man rides a bike.", "max_tokens": 8, "temperature": 0}),
    ("/v1/attention", {"model": "tiny-gpt", "prompt": "ROMEO: But soft", "max_tokens": 3, "temperature": 0}),
    ("/v1/completions", {"model": "tiny-gpt", "prompt": "x", "max_tokens": 6, "temperature": 0,
                         "guided_choice": ["Romeo", "Juliet"]}),
    ("/v1/completions", {"model": "tiny-gpt", "prompt": "ROMEO:", "max_tokens": 500}),  # too long: the same 400
]
VOLATILE = re.compile(r'"(id|created|request_id|timing|latency_ms|ttft|e2e|\w*time\w*)": ?("[^"]*"|[0-9.e-]+|\{[^}]*\})')


def scrub(text: str) -> str:
    return VOLATILE.sub(r'"\1": _', text)


def same(a: Any, b: Any) -> bool:
    """Equal, but for floats within 0.02: log-probs move in the third decimal with the batch a request shares
    (its rows' reductions), and the two servers batch by their own timing. Tokens and text must be equal."""
    if isinstance(a, float) and isinstance(b, float):
        return abs(a - b) <= 0.02
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


def parsed(text: str) -> Any:
    try:
        return json.loads(scrub(text).replace(": _", ": null"))
    except ValueError:
        return scrub(text)

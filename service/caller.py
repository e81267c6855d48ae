"""What one HTTP request shares with the engine requests it opens: its deadline (from X-Request-Timeout) and,
for its access-log line, the token counts of those requests once their streams close. Set by the gatekeeper
for the duration of one HTTP request; the engine never sees it."""

from __future__ import annotations

import contextvars
from dataclasses import dataclass


@dataclass
class Caller:
    deadline: float | None = None  # monotonic seconds
    prompt: str | None = None  # the request's text, set only where the service logs prompts
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def count(self, prompt_tokens: int, output_tokens: int) -> None:
        """A stream of this caller's closed: add its tokens (the prompt as the caller sent it)."""
        self.prompt_tokens += prompt_tokens
        self.completion_tokens += output_tokens


CALLER: contextvars.ContextVar[Caller | None] = contextvars.ContextVar("attnserve_caller", default=None)

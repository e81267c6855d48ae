"""Turning next-token logits into a choice, for a whole batch at once: one source for the reference decoder and
the serving engine. Every operation is row-wise, so a row's result does not depend on the rest of the batch."""

from __future__ import annotations

import torch
from torch import Tensor


def filter_logits(logits: Tensor, temperature: Tensor, top_k: Tensor | None = None, top_p: Tensor | None = None,
                  min_p: Tensor | None = None) -> Tensor:
    """Temperature, then top-k, top-p (the smallest set of tokens whose probability reaches top_p) and min-p
    (tokens at least min_p times as likely as the most likely one); removed entries become -inf.
    logits (B, V); temperature, top_k (0: off), top_p (1: off), min_p (0: off) are (B,)."""
    logits = logits / temperature[:, None]
    if top_k is not None or top_p is not None:
        ordered, order = torch.sort(logits, dim=-1, descending=True)  # (B, V)
        if top_k is not None:
            k = top_k.long().clamp(min=1, max=logits.size(-1))
            kth = ordered.gather(1, (k - 1)[:, None])  # (B, 1)
            logits = logits.masked_fill((top_k[:, None] > 0) & (logits < kth), float("-inf"))
        if top_p is not None:
            probs = ordered.softmax(-1)
            remove = probs.cumsum(-1) - probs >= top_p[:, None]  # keep the smallest prefix that reaches top_p
            logits = logits.masked_fill(remove.scatter(-1, order, remove), float("-inf"))
    if min_p is not None:
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < min_p[:, None] * probs.amax(-1, keepdim=True), float("-inf"))
    return logits


def sample(probs: Tensor, noise: Tensor) -> Tensor:
    """One token per row with probability probs, given Exp(1) noise of the same shape: argmax(p / q) is a draw
    from p (the exponential race; no host sync, unlike torch.multinomial). (B, V) -> (B,)."""
    return (probs / noise).argmax(-1)


def exponential_noise(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> Tensor:
    return torch.empty(shape, device=device).exponential_(generator=generator)

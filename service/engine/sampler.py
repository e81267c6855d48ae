"""Logits to tokens: penalties, temperature, top-k, top-p, per-request seeded generators, logprobs.

Each row is processed on its own (row-wise ops only), so a request's choice never depends on what else is in
the batch; a seeded request draws from its own generator, so the same seed gives the same text at any load."""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import torch
from torch import Tensor

from service.engine.request import Request, SamplingParams, TokenLogprob


@dataclass(frozen=True)
class Sample:
    token_id: int
    logprob: float
    top_logprobs: tuple[TokenLogprob, ...]
    error: str | None = None  # this request's logits were unusable; the engine fails it alone


def apply_penalties(logits: Tensor, params: SamplingParams, prompt_ids: list[int], output_ids: list[int]) -> Tensor:
    """Repetition penalty (CTRL: divide positive / multiply negative logits of seen tokens, prompt included);
    presence and frequency penalties (OpenAI: subtract per generated token)."""
    if params.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(prompt_ids) | set(output_ids)), dtype=torch.long, device=logits.device)
        if seen.numel():
            vals = logits[seen]
            logits = logits.clone()
            logits[seen] = torch.where(vals > 0, vals / params.repetition_penalty, vals * params.repetition_penalty)
    if (params.presence_penalty or params.frequency_penalty) and output_ids:
        counts = torch.bincount(torch.tensor(output_ids, device=logits.device), minlength=logits.numel()).to(logits)
        logits = logits - params.frequency_penalty * counts - params.presence_penalty * (counts > 0).to(logits)
    return logits


def filter_logits(logits: Tensor, temperature: float, top_k: int, top_p: float) -> Tensor:
    """Temperature, then top-k, then top-p (the smallest set of tokens whose probability reaches top_p)."""
    logits = logits / temperature
    if 0 < top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(-1)
        remove = probs.cumsum(-1) - probs >= top_p
        logits = logits.masked_fill(remove.scatter(-1, order, remove), float("-inf"))
    return logits


class Sampler:
    """Chooses one token per row of logits, with each request's own parameters and generator."""

    def __init__(self) -> None:
        self.generators: dict[str, torch.Generator] = {}
        self._default = torch.Generator()
        self._default.seed()

    def generator(self, req: Request) -> torch.Generator:
        if req.params.seed is None:
            return self._default
        gen = self.generators.get(req.request_id)
        if gen is None:
            gen = self.generators[req.request_id] = torch.Generator().manual_seed(req.params.seed)
        return gen

    def release(self, request_id: str) -> None:
        self.generators.pop(request_id, None)

    def __call__(self, logits: Tensor, requests: list[Request]) -> list[Sample]:
        """logits (B, vocab) float32 on any device -> one Sample per request."""
        logits = logits.float().cpu()
        greedy_ids = logits.argmax(-1).tolist()
        want_logprobs = any(r.params.logprobs is not None for r in requests)
        logprobs = logits.log_softmax(-1) if want_logprobs else None
        out = []
        for i, req in enumerate(requests):
            p = req.params
            row = apply_penalties(logits[i], p, req.prompt_ids, req.output_ids)
            if bool(torch.isnan(row).any()) or not bool(torch.isfinite(row).any()):
                out.append(Sample(-1, 0.0, (), error="the model produced NaN or infinite logits"))
                continue
            if p.greedy:
                token = greedy_ids[i] if row is logits[i] else int(row.argmax())
            else:
                probs = filter_logits(row, p.temperature, p.top_k, p.top_p).softmax(-1)
                token = int(torch.multinomial(probs, 1, generator=self.generator(req)))
            lp, top = 0.0, cast(tuple[TokenLogprob, ...], ())
            if logprobs is not None and p.logprobs is not None:
                lp = float(logprobs[i, token])
                if p.logprobs > 0:
                    vals, idx = logprobs[i].topk(min(p.logprobs, logprobs.size(1)))
                    top = tuple(TokenLogprob(int(t), float(v)) for v, t in zip(vals, idx, strict=True))
            out.append(Sample(token, lp, top))
        return out

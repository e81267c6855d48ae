"""Logits to tokens on the device, for the whole batch at once: penalties, temperature, top-k, top-p, min-p,
per-request seeds, logprobs. The result is packed into one tensor so that the step has one device-to-host copy.

Each row is processed on its own (row-wise ops only) and a seeded request draws its noise from its own
generator, so the same seed gives the same tokens alone or anywhere in a batch of any size."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from model import fused_step
from model.sampling import filter_logits, sample
from service.engine.request import Request, SamplingParams

ERROR_NAN = "the model produced NaN or infinite logits"
PARAMS = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty")


def param_values(p: SamplingParams) -> list[float]:
    """One row's column of the params tensor, in PARAMS order."""
    return [float(getattr(p, name)) for name in PARAMS]


def plain_greedy(req: Request) -> bool:
    """Whether the row takes the argmax of the model's logits as they are: greedy, no penalty, no logprobs, no
    stop held back by min_tokens."""
    p = req.params
    return p.greedy and not p.penalized and p.logprobs is None and len(req.output_ids) >= p.min_tokens


class Sampler:
    """Chooses one token per row of logits with each request's parameters; owns the seeded generators."""

    def __init__(self, device: torch.device, eos_id: int | None = None) -> None:
        self.device, self.eos_id = device, eos_id
        self.generators: dict[str, torch.Generator] = {}
        self._default = torch.Generator(device=device)
        self._default.seed()
        self.greedy_kernel = fused_step.kernel() if self.device.type == "cpu" else None

    def generator(self, req: Request) -> torch.Generator:
        gen = self.generators.get(req.request_id)
        if gen is None:
            assert req.params.seed is not None
            gen = self.generators[req.request_id] = torch.Generator(self.device).manual_seed(req.params.seed)
        return gen

    def release(self, request_id: str) -> None:
        self.generators.pop(request_id, None)

    def penalize(self, logits: Tensor, reqs: list[Request]) -> Tensor:
        """Repetition penalty (CTRL: divide positive / multiply negative logits of seen tokens, prompt included);
        presence and frequency penalties (OpenAI: subtract per generated token). Only rows that ask pay for it
        (their token lists travel to the device then)."""
        logits = logits.clone()
        for j, req in enumerate(reqs):
            p = req.params
            if not p.penalized:
                continue
            row = logits[j]
            if p.repetition_penalty != 1.0:
                seen = torch.tensor(sorted(set(req.prompt_ids) | set(req.output_ids)), dtype=torch.long,
                                    device=logits.device)
                vals = row[seen]
                row[seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
            if (p.presence_penalty or p.frequency_penalty) and req.output_ids:
                out = torch.tensor(req.output_ids, device=logits.device)
                counts = torch.bincount(out, minlength=row.numel()).to(row)
                row -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(row)
        return logits

    def hold_stops(self, logits: Tensor, reqs: list[Request], rows: list[int]) -> Tensor:
        """min_tokens: EOS and the stop token ids cannot be chosen by rows that have not reached it yet."""
        logits = logits.clone()
        for j, req in zip(rows, reqs, strict=True):
            stops = [t for t in (self.eos_id, *req.params.stop_token_ids) if t is not None and 0 <= t < logits.size(1)]
            if stops:
                logits[j, stops] = float("-inf")
        return logits

    def __call__(self, logits: Tensor, params: Tensor, reqs: list[Request],
                 mask: Callable[[Tensor], None] | None = None) -> Tensor:
        """logits (R, V) float32 and params (len(PARAMS), >= R) on the device -> packed (R, 2 + [1 + 2K]):
        token id, bad-row flag, then the chosen token's logprob and the top-K (values, ids) if any row asks.
        `mask` sets the tokens that constrained rows' grammars forbid to -inf, first; log-probs stay the model's."""
        n = len(reqs)
        if mask is None and all(plain_greedy(r) for r in reqs):  # the same choice as below, in the fewest ops
            if self.greedy_kernel is not None and logits.device.type == "cpu":
                return self.greedy_kernel.greedy(logits)  # one pass, in C++ (csrc/decoder_step.cpp)
            best, ids = logits.max(-1)
            return torch.stack((ids.to(torch.float32), (~torch.isfinite(best)).to(torch.float32)), dim=1)
        temperature, top_k, top_p, min_p = params[0, :n], params[1, :n], params[2, :n], params[3, :n]
        x = self.penalize(logits, reqs) if any(r.params.penalized for r in reqs) else logits
        if mask is not None:
            x = x.clone() if x is logits else x
            mask(x)
        early = [j for j, r in enumerate(reqs) if len(r.output_ids) < r.params.min_tokens and r.matcher is None]
        if early:
            x = self.hold_stops(x, [reqs[j] for j in early], early)
        best, ids = x.max(-1)  # one pass: the greedy choice, and NaN or inf (max propagates NaN) marks a bad row
        bad = ~torch.isfinite(best)  # (R,) a bad row fails alone
        if not all(r.params.greedy for r in reqs):
            x = filter_logits(x, temperature.clamp(min=1e-5),
                              top_k if any(r.params.top_k > 0 for r in reqs) else None,
                              top_p if any(r.params.top_p < 1.0 for r in reqs) else None,
                              min_p if any(r.params.min_p > 0.0 for r in reqs) else None)
            probs = torch.nan_to_num(x.softmax(-1), nan=0.0)
            noise = torch.empty_like(probs).exponential_(generator=self._default)
            for j, req in enumerate(reqs):
                if req.params.seed is not None and not req.params.greedy:
                    noise[j].exponential_(generator=self.generator(req))
            ids = torch.where(temperature == 0.0, ids, sample(probs, noise))
        cols = [ids.to(torch.float32)[:, None], bad.to(torch.float32)[:, None]]
        if any(r.params.logprobs is not None for r in reqs):
            lp = logits.log_softmax(-1)
            cols.append(lp.gather(1, ids[:, None]))
            k = max((r.params.logprobs or 0) for r in reqs)
            if k:
                vals, idx = lp.topk(min(k, lp.size(1)), dim=-1)
                cols += [vals, idx.to(torch.float32)]
        return torch.cat(cols, dim=1)

"""The reference decoder for ONE sequence: greedy, sampling and beam search, with or without the KV cache.

Plain and slow on purpose: it is the oracle the batched serving engine is tested against."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from model.kv_cache import ContiguousKVCache
from model.sampling import exponential_noise, filter_logits, sample
from model.transformer import DecoderOnlyLM, Transformer


@dataclass(frozen=True)
class GenerationConfig:
    """How to pick tokens. temperature 0 means greedy."""

    max_new_tokens: int = 32
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    num_beams: int = 1
    length_penalty: float = 0.6  # GNMT's alpha, used by the paper with beam 4
    eos_id: int | None = None
    use_cache: bool = True


class _Stepper:
    """Next-token logits for a growing prefix, through the cache or by re-running the full forward."""

    def __init__(self, model: Transformer | DecoderOnlyLM, source: list[int] | None, batch: int, use_cache: bool):
        self.model, self.use_cache = model, use_cache
        device = next(model.parameters()).device
        self.device, self.memory = device, None
        if isinstance(model, Transformer):
            assert source is not None, "an encoder-decoder model needs a source"
            src = torch.tensor([source], device=device)
            self.memory = model.encode(src).expand(batch, -1, -1)
        dtype = next(model.parameters()).dtype
        self.cache = ContiguousKVCache(model.config, batch, device=device, dtype=dtype) if use_cache else None
        self.fed = 0  # tokens already in the cache

    def __call__(self, seqs: Tensor) -> Tensor:
        """seqs (B, T) -> logits (B, vocab) for the token after each row."""
        if self.cache is None:
            hidden = self.model.decode(seqs, memory=self.memory)
        else:
            new = seqs[:, self.fed :]
            positions = torch.arange(self.fed, seqs.size(1), device=seqs.device).expand_as(new)
            hidden = self.model.decode(new, positions, memory=self.memory, cache=self.cache)
            self.fed = seqs.size(1)
        return self.model.logits(hidden[:, -1]).float()


@torch.no_grad()
def generate(
    model: Transformer | DecoderOnlyLM,
    prompt: list[int],
    cfg: GenerationConfig,
    source: list[int] | None = None,
) -> list[int]:
    """New token ids after `prompt` (for a translator: after the target prefix, e.g. [BOS], given `source`).
    The EOS token, if produced, ends the output and is not included."""
    if cfg.num_beams > 1:
        return beam_search(model, prompt, cfg, source)
    max_total = model.config.max_len
    step = _Stepper(model, source, 1, cfg.use_cache)
    gen = torch.Generator(step.device).manual_seed(cfg.seed) if cfg.seed is not None else None
    seq = torch.tensor([prompt], device=step.device)
    out: list[int] = []
    for _ in range(cfg.max_new_tokens):
        if seq.size(1) >= max_total:
            break
        logits = step(seq)[0]
        if cfg.temperature == 0.0:
            token = int(logits.argmax())
        else:
            row = logits[None]  # (1, V)
            one = row.new_ones(1)
            probs = filter_logits(row, one * cfg.temperature, one * cfg.top_k if cfg.top_k > 0 else None,
                                  one * cfg.top_p if cfg.top_p < 1.0 else None).softmax(-1)
            token = int(sample(probs, exponential_noise(tuple(probs.shape), gen, probs.device))[0])
        if token == cfg.eos_id:
            break
        out.append(token)
        seq = torch.cat([seq, seq.new_tensor([[token]])], dim=1)  # the oracle may concatenate; the engine does not
    return out


def length_penalty(length: int, alpha: float) -> float:
    return ((5 + length) / 6) ** alpha  # GNMT (Wu et al. 2016)


@torch.no_grad()
def beam_search(
    model: Transformer | DecoderOnlyLM, prompt: list[int], cfg: GenerationConfig, source: list[int] | None = None
) -> list[int]:
    """Beam search keeping `num_beams` hypotheses; finished ones are scored by log p / length_penalty."""
    k = cfg.num_beams
    step = _Stepper(model, source, k, cfg.use_cache)
    seqs = torch.tensor([prompt] * k, device=step.device)
    scores = torch.zeros(k, device=step.device)
    scores[1:] = float("-inf")  # all beams start identical: expand only the first
    finished: list[tuple[float, list[int]]] = []
    n = len(prompt)
    for t in range(cfg.max_new_tokens):
        if seqs.size(1) >= model.config.max_len:
            break
        logp = step(seqs).log_softmax(-1)  # (k, V)
        cand = (scores[:, None] + logp).view(-1)
        top, idx = cand.topk(2 * k)
        beam, token = idx // logp.size(1), idx % logp.size(1)
        keep_beam, keep_tok, keep_score = [], [], []
        for s, b, tok in zip(top.tolist(), beam.tolist(), token.tolist(), strict=True):
            if tok == cfg.eos_id:
                finished.append((s / length_penalty(t + 1, cfg.length_penalty), seqs[b, n:].tolist()))
            else:
                keep_beam.append(b)
                keep_tok.append(tok)
                keep_score.append(s)
            if len(keep_beam) == k:
                break
        if len(finished) >= k:  # early stopping, as fairseq and Hugging Face's early_stopping=True
            break
        index = torch.tensor(keep_beam, device=seqs.device)
        if step.cache is not None:
            step.cache.reorder(index)
        seqs = torch.cat([seqs[index], torch.tensor(keep_tok, device=seqs.device)[:, None]], dim=1)
        scores = torch.tensor(keep_score, device=seqs.device)
    if len(finished) < k:  # out of steps: unfinished hypotheses compete as they are
        for s, b in zip(scores.tolist(), range(k), strict=True):
            if s > float("-inf"):
                finished.append((s / length_penalty(seqs.size(1) - n, cfg.length_penalty), seqs[b, n:].tolist()))
    return max(finished, key=lambda f: f[0])[1]

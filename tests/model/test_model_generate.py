"""The reference decoder: greedy, beam search, sampling, and logit filtering."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch

from model.generate import GenerationConfig, beam_search, generate
from model.sampling import filter_logits as filter_batch
from model.transformer import DecoderOnlyLM, Transformer

pytestmark = pytest.mark.usefixtures("one_thread")

Make = Callable[..., Transformer | DecoderOnlyLM]
PROMPT = [1, 17, 5, 33, 8]
SOURCE = [4, 9, 22, 3, 41, 7, 2]


def _model_and_source(make: Make, arch: str) -> tuple[Transformer | DecoderOnlyLM, list[int] | None]:
    # Larger init than the default so greedy choices are not near-ties (cached and uncached paths round apart).
    model = make(arch, seed=7)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(3.0)
    return model, SOURCE if arch == "encoder-decoder" else None


ARCHS = ["decoder-only", "encoder-decoder"]


def _greedy_by_hand(model: Transformer | DecoderOnlyLM, source: list[int] | None, n: int) -> list[int]:
    """Argmax of the full forward, one token at a time: no cache, no generate()."""
    seq = list(PROMPT)
    with torch.no_grad():
        memory = model.encode(torch.tensor([source])) if isinstance(model, Transformer) else None
        for _ in range(n):
            logits = model.logits(model.decode(torch.tensor([seq]), memory=memory))[0, -1]
            seq.append(int(logits.argmax()))
    return seq[len(PROMPT) :]


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_matches_argmax_of_full_forward(make: Make, arch: str) -> None:
    model, source = _model_and_source(make, arch)
    got = generate(model, PROMPT, GenerationConfig(max_new_tokens=12), source)
    assert got == _greedy_by_hand(model, source, 12)


@pytest.mark.parametrize("arch", ARCHS)
def test_cached_equals_uncached(make: Make, arch: str) -> None:
    model, source = _model_and_source(make, arch)
    configs = {
        "greedy": GenerationConfig(max_new_tokens=16),
        "sampling": GenerationConfig(max_new_tokens=16, temperature=0.8, top_k=20, top_p=0.9, seed=3),
        "beam": GenerationConfig(max_new_tokens=10, num_beams=3),
    }
    for name, cfg in configs.items():
        cached = generate(model, PROMPT, cfg, source)
        uncached = generate(model, PROMPT, GenerationConfig(**{**cfg.__dict__, "use_cache": False}), source)
        assert cached == uncached, f"{arch} {name}: cached {cached} != uncached {uncached}"


@pytest.mark.parametrize("arch", ARCHS)
def test_beam_search_cached_equals_uncached(make: Make, arch: str) -> None:
    """Over several prompts, so that beams change places and the cache has to follow them (reorder)."""
    model, source = _model_and_source(make, arch)
    for prompt in ([1, 17, 5, 33, 8], [2], [3, 4], [9, 9, 9], [60, 1, 2, 3], [12, 40]):
        cfg = GenerationConfig(max_new_tokens=10, num_beams=4)
        cached = beam_search(model, prompt, cfg, source)
        uncached = beam_search(model, prompt, GenerationConfig(**{**cfg.__dict__, "use_cache": False}), source)
        assert cached == uncached, f"{arch} prompt {prompt}: cached beams {cached} != uncached {uncached}"


@pytest.mark.parametrize("arch", ARCHS)
def test_beam_of_one_is_greedy(make: Make, arch: str) -> None:
    model, source = _model_and_source(make, arch)
    greedy = generate(model, PROMPT, GenerationConfig(max_new_tokens=12), source)
    assert beam_search(model, PROMPT, GenerationConfig(max_new_tokens=12, num_beams=1), source) == greedy
    # With an EOS that greedy produces mid-way, both stop there and leave it out.
    eos = greedy[5]
    first = greedy.index(eos)
    cfg = GenerationConfig(max_new_tokens=12, eos_id=eos)
    assert generate(model, PROMPT, cfg, source) == greedy[:first]
    assert beam_search(model, PROMPT, GenerationConfig(**{**cfg.__dict__, "num_beams": 1}), source) == greedy[:first]


def test_wider_beam_finds_at_least_as_likely_a_sequence(make: Make) -> None:
    model, _ = _model_and_source(make, "decoder-only")

    def logprob(cont: list[int]) -> float:
        seq = torch.tensor([PROMPT + cont])
        with torch.no_grad():
            lp = model(seq)[0, :-1].log_softmax(-1)
        return lp[len(PROMPT) - 1 :].gather(1, seq[0, len(PROMPT) :, None]).sum().item()

    cfg = dict(max_new_tokens=8, length_penalty=0.0)  # no EOS: every hypothesis has the same length
    greedy = beam_search(model, PROMPT, GenerationConfig(num_beams=1, **cfg))  # type: ignore[arg-type]
    wide = beam_search(model, PROMPT, GenerationConfig(num_beams=4, **cfg))  # type: ignore[arg-type]
    assert len(wide) == 8
    assert logprob(wide) >= logprob(greedy) - 1e-4, "beam 4 found a less likely sequence than greedy"


def test_seeded_sampling_is_reproducible(make: Make) -> None:
    model, _ = _model_and_source(make, "decoder-only")
    cfg = GenerationConfig(max_new_tokens=24, temperature=1.5, seed=123)
    first = generate(model, PROMPT, cfg)
    assert generate(model, PROMPT, cfg) == first, "same seed, different samples"
    other = generate(model, PROMPT, GenerationConfig(max_new_tokens=24, temperature=1.5, seed=124))
    assert other != first, "different seeds gave the same 24 samples: is the seed used?"


@pytest.mark.parametrize("arch", ARCHS)
def test_top_k_one_is_greedy(make: Make, arch: str) -> None:
    model, source = _model_and_source(make, arch)
    greedy = generate(model, PROMPT, GenerationConfig(max_new_tokens=12), source)
    sampled = generate(model, PROMPT, GenerationConfig(max_new_tokens=12, temperature=2.0, top_k=1, seed=5), source)
    assert sampled == greedy


def test_generation_stops_at_max_len(make: Make) -> None:
    model = make("decoder-only", max_len=10)
    out = generate(model, PROMPT, GenerationConfig(max_new_tokens=50))
    assert len(PROMPT) + len(out) == 10


def _kept(logits: torch.Tensor) -> set[int]:
    return {i for i, x in enumerate(logits.tolist()) if x != float("-inf")}


def filter_logits(logits: torch.Tensor, t: float, k: int, p: float, min_p: float = 0.0) -> torch.Tensor:
    """One row through the batched filter (B = 1)."""
    one = torch.ones(1)
    return filter_batch(logits[None], one * t, one * k if k else None, one * p if p < 1 else None,
                        one * min_p if min_p else None)[0]


def test_filter_logits_min_p_keeps_tokens_at_least_that_likely_relative_to_the_best() -> None:
    probs = torch.tensor([0.05, 0.5, 0.02, 0.3, 0.13])
    logits = probs.log()
    assert _kept(filter_logits(logits, 1.0, 0, 1.0, min_p=0.25)) == {1, 3, 4}  # >= 0.125
    assert _kept(filter_logits(logits, 1.0, 0, 1.0, min_p=0.7)) == {1}


def test_filter_logits_top_p_keeps_the_smallest_set_reaching_p() -> None:
    probs = torch.tensor([0.1, 0.4, 0.05, 0.3, 0.15])  # sorted: 1 (0.4), 3 (0.3), 4 (0.15), 0 (0.1), 2 (0.05)
    logits = probs.log()
    cases = {0.3: {1}, 0.65: {1, 3}, 0.8: {1, 3, 4}, 0.9: {0, 1, 3, 4}, 0.99: {0, 1, 2, 3, 4}, 1.0: {0, 1, 2, 3, 4}}
    for p, expected in cases.items():
        out = filter_logits(logits, 1.0, 0, p)
        assert _kept(out) == expected, f"top_p={p}: kept {sorted(_kept(out))}, expected {sorted(expected)}"
        assert torch.equal(out[sorted(expected)], logits[sorted(expected)]), "kept logits must be unchanged"


def test_filter_logits_temperature_and_top_k() -> None:
    logits = torch.tensor([2.0, -1.0, 0.5, 3.0, 1.0])
    assert torch.allclose(filter_logits(logits, 2.0, 0, 1.0), logits / 2)
    assert _kept(filter_logits(logits, 1.0, 2, 1.0)) == {0, 3}
    assert _kept(filter_logits(logits, 1.0, 1, 1.0)) == {3}
    assert _kept(filter_logits(logits, 1.0, 10, 1.0)) == {0, 1, 2, 3, 4}, "top_k >= V keeps everything"
    # top-k first, then top-p within what is left: softmax of [3, 2] is [0.73, 0.27], so p=0.5 keeps only 3.
    assert _kept(filter_logits(logits, 1.0, 2, 0.5)) == {3}
    hot = filter_logits(logits, 0.5, 0, 1.0).softmax(-1)
    assert math.isclose(hot.max().item(), (logits * 2).softmax(-1).max().item(), rel_tol=1e-6)

"""The sampler on hand-made logits: temperature, top-k, top-p, penalties, logprobs, seeds and batch independence."""

from __future__ import annotations

import math

import pytest
import torch

from model.generate import filter_logits as reference_filter
from service.engine.request import Request, SamplingParams
from service.engine.sampler import Sampler, apply_penalties, filter_logits

NEG_INF = float("-inf")


def request(rid: str, prompt: list[int] | None = None, output: list[int] | None = None, **params: object) -> Request:
    req = Request(rid, prompt if prompt is not None else [0], SamplingParams(**params))  # type: ignore[arg-type]
    req.output_ids = list(output or [])
    return req


def test_temperature_divides_the_logits() -> None:
    logits = torch.tensor([0.0, math.log(3.0)])  # probabilities 1/4, 3/4
    assert filter_logits(logits, 1.0, 0, 1.0).softmax(-1).tolist() == pytest.approx([0.25, 0.75])
    # at temperature 2 the odds 3:1 become sqrt(3):1
    p = filter_logits(logits, 2.0, 0, 1.0).softmax(-1)
    assert float(p[1] / p[0]) == pytest.approx(math.sqrt(3.0))
    sharp = filter_logits(logits, 0.05, 0, 1.0).softmax(-1)
    assert float(sharp[1]) > 0.999999


def test_top_k_keeps_the_k_largest() -> None:
    logits = torch.tensor([1.0, 4.0, 3.0, 2.0, 0.0])
    out = filter_logits(logits, 1.0, 2, 1.0)
    assert out.tolist() == [NEG_INF, 4.0, 3.0, NEG_INF, NEG_INF]
    assert filter_logits(logits, 1.0, 0, 1.0).tolist() == logits.tolist()  # 0 disables
    assert filter_logits(logits, 1.0, 99, 1.0).tolist() == logits.tolist()  # k >= vocab keeps all


def test_top_p_keeps_the_smallest_set_reaching_p() -> None:
    probs = torch.tensor([0.15, 0.5, 0.05, 0.3])
    logits = probs.log()
    kept = lambda p: [i for i, v in enumerate(filter_logits(logits, 1.0, 0, p).tolist()) if v > NEG_INF]  # noqa: E731
    assert kept(0.4) == [1]  # 0.5 alone reaches 0.4
    assert kept(0.5) == [1]  # exactly reached
    assert kept(0.7) == [1, 3]  # 0.5 + 0.3
    assert kept(0.9) == [0, 1, 3]  # 0.95
    assert kept(1.0) == [0, 1, 2, 3]
    renorm = filter_logits(logits, 1.0, 0, 0.7).softmax(-1)
    assert renorm.tolist() == pytest.approx([0.0, 0.625, 0.0, 0.375])


def test_filters_agree_with_the_reference_decoder() -> None:
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        logits = torch.randn(50, generator=gen) * 3
        for t, k, p in [(1.0, 0, 0.9), (0.7, 10, 1.0), (1.3, 5, 0.5), (1.0, 0, 1.0)]:
            assert torch.equal(filter_logits(logits, t, k, p), reference_filter(logits, t, k, p))


def test_repetition_penalty_divides_positive_and_multiplies_negative_seen_logits() -> None:
    logits = torch.tensor([4.0, -2.0, 1.0, -1.0])
    params = SamplingParams(repetition_penalty=2.0)
    out = apply_penalties(logits, params, prompt_ids=[0], output_ids=[1])  # the prompt counts too
    assert out.tolist() == [2.0, -4.0, 1.0, -1.0]
    assert logits.tolist() == [4.0, -2.0, 1.0, -1.0]  # the input is not modified


def test_presence_and_frequency_penalties_subtract_per_generated_token() -> None:
    logits = torch.zeros(4)
    params = SamplingParams(presence_penalty=0.5, frequency_penalty=0.25)
    out = apply_penalties(logits, params, prompt_ids=[3, 3, 3], output_ids=[1, 1, 2])  # the prompt does not count
    assert out.tolist() == pytest.approx([0.0, -(0.5 + 2 * 0.25), -(0.5 + 0.25), 0.0])
    assert apply_penalties(logits, SamplingParams(), [1], [1]) is logits  # no penalty: untouched


def test_penalties_change_the_greedy_choice() -> None:
    logits = torch.tensor([[0.0, 3.0, 2.0]])
    assert Sampler()(logits, [request("a", output=[1], temperature=0.0)])[0].token_id == 1
    penalized = request("b", output=[1], temperature=0.0, repetition_penalty=2.0)
    assert Sampler()(logits, [penalized])[0].token_id == 2  # 3 / 2 < 2


def test_greedy_is_argmax_and_reports_logprobs() -> None:
    logits = torch.tensor([[0.0, 2.0, 1.0, -1.0], [5.0, 0.0, 0.0, 0.0]])
    reqs = [request("a", temperature=0.0, logprobs=2), request("b", temperature=0.0)]
    a, b = Sampler()(logits, reqs)
    assert (a.token_id, b.token_id) == (1, 0)
    lsm = logits[0].log_softmax(-1)
    assert a.logprob == pytest.approx(float(lsm[1]))
    assert [t.token_id for t in a.top_logprobs] == [1, 2]
    assert [t.logprob for t in a.top_logprobs] == pytest.approx([float(lsm[1]), float(lsm[2])])
    assert b.top_logprobs == ()


def test_top_k_sampling_never_leaves_the_top_k() -> None:
    logits = torch.tensor([[2.0, 1.9, 1.8, 1.7, 0.0, 0.0]])
    sampler = Sampler()
    seen = {sampler(logits, [request(f"r{i}", top_k=2, seed=i)])[0].token_id for i in range(200)}
    assert seen == {0, 1}


def test_sampled_frequencies_follow_the_temperature() -> None:
    logits = torch.tensor([[0.0, math.log(3.0)]])
    sampler = Sampler()
    req = request("r", seed=123)
    ones = sum(sampler(logits, [req])[0].token_id for _ in range(4000))
    assert abs(ones / 4000 - 0.75) < 0.03  # binomial sd ~0.007


def _draws(sampler: Sampler, logits_fn: object, req: Request, others: list[Request], position: int, n: int) -> list[int]:
    out = []
    for step in range(n):
        row = logits_fn(step)  # type: ignore[operator]
        batch = [*others[:position], req, *others[position:]]
        logits = torch.stack([row] * len(batch)) + torch.randn(len(batch), row.numel()) * (
            torch.arange(len(batch)) != position
        )[:, None]  # the neighbours' rows differ; this request's row is always `row`
        samples = sampler(logits, batch)
        out.append(samples[position].token_id)
        req.output_ids.append(samples[position].token_id)
    return out


def test_same_seed_same_tokens_whatever_the_batch() -> None:
    gen = torch.Generator().manual_seed(1)
    rows = [torch.randn(40, generator=gen) for _ in range(12)]
    fn = rows.__getitem__
    params = dict(temperature=1.0, top_p=0.9, seed=7)
    alone = _draws(Sampler(), fn, request("x", **params), [], 0, 12)  # type: ignore[arg-type]
    others = [request(f"o{i}", seed=i if i % 2 else None, temperature=1.0) for i in range(5)]
    crowded = _draws(Sampler(), fn, request("x", **params), others, 3, 12)  # type: ignore[arg-type]
    assert alone == crowded
    other_seed = _draws(Sampler(), fn, request("x", temperature=1.0, top_p=0.9, seed=8), others, 0, 12)
    assert other_seed != alone


def test_seeded_sampler_matches_the_reference_decoders_draws() -> None:
    """Same seed, same filtered distribution, same generator: the engine's draw equals model.generate's."""
    gen = torch.Generator().manual_seed(3)
    rows = [torch.randn(30, generator=gen) for _ in range(10)]
    sampler, req = Sampler(), request("x", temperature=0.8, top_k=12, top_p=0.95, seed=99)
    ref_gen = torch.Generator().manual_seed(99)
    for row in rows:
        ref = int(torch.multinomial(reference_filter(row, 0.8, 12, 0.95).softmax(-1), 1, generator=ref_gen))
        assert sampler(row[None], [req])[0].token_id == ref


def test_nan_logits_fail_only_their_row() -> None:
    logits = torch.tensor([[0.0, float("nan")], [0.0, 1.0]])
    bad, good = Sampler()(logits, [request("a"), request("b", temperature=0.0)])
    assert bad.error is not None and good.error is None and good.token_id == 1


def test_release_forgets_the_generator() -> None:
    sampler, req = Sampler(), request("x", seed=5)
    logits = torch.zeros(1, 1000)
    first = sampler(logits, [req])[0].token_id
    sampler.release("x")
    assert "x" not in sampler.generators
    assert sampler(logits, [req])[0].token_id == first  # a fresh generator from the same seed

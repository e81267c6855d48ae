"""The batched sampler: greedy is argmax, logprobs are the model's, penalties and filters do what OpenAI and
vLLM say, a seeded request draws the same tokens alone or anywhere in a batch of 32 (and the same as the
reference decoder), and a NaN row fails alone."""

from __future__ import annotations

import math

import torch

from model.config import preset
from model.generate import GenerationConfig, generate
from model.sampling import filter_logits
from model.transformer import build_model
from service.engine.request import Request, SamplingParams
from service.engine.sampler import Sampler, param_values


def request(rid: str, prompt: list[int] | None = None, output: list[int] | None = None, **params: object) -> Request:
    req = Request(rid, prompt or [0], SamplingParams(**params))  # type: ignore[arg-type]
    req.output_ids = list(output or [])
    return req


def run(sampler: Sampler, logits: torch.Tensor, reqs: list[Request]) -> list[list[float]]:
    """The packed rows the runner brings back: [id, bad, (logprob, top values..., top ids...)]."""
    params = torch.tensor([param_values(r.params) for r in reqs]).T.contiguous()
    return sampler(logits.float(), params, reqs).tolist()


def token(sampler: Sampler, logits: torch.Tensor, reqs: list[Request], i: int = 0) -> int:
    return int(run(sampler, logits, reqs)[i][0])


def test_greedy_is_argmax_and_reports_the_models_logprobs() -> None:
    logits = torch.tensor([[0.1, 2.0, -1.0, 1.5], [3.0, 0.0, 0.0, 0.0]])
    reqs = [request("a", temperature=0.0, logprobs=2), request("b", temperature=0.0)]
    a, b = run(Sampler(torch.device("cpu")), logits, reqs)
    lp = logits.log_softmax(-1)
    assert (a[0], b[0], a[1], b[1]) == (1, 0, 0, 0)
    assert math.isclose(a[2], lp[0, 1].item(), rel_tol=1e-6)
    assert a[3:5] == [lp[0, 1].item(), lp[0, 3].item()] and a[5:7] == [1.0, 3.0]  # top-2 values, then ids


def test_penalties_change_the_greedy_choice() -> None:
    logits = torch.tensor([[0.0, 3.0, 2.0]])
    s = Sampler(torch.device("cpu"))
    assert token(s, logits, [request("a", output=[1], temperature=0.0)]) == 1
    assert token(s, logits, [request("b", output=[1], temperature=0.0, repetition_penalty=2.0)]) == 2  # 3/2 < 2
    assert token(s, logits, [request("c", output=[1, 1], temperature=0.0, frequency_penalty=0.6)]) == 2  # 3-1.2
    assert token(s, logits, [request("d", output=[1], temperature=0.0, presence_penalty=0.5)]) == 1  # 2.5 > 2
    assert token(s, logits, [request("e", prompt=[1], temperature=0.0, repetition_penalty=2.0)]) == 2  # prompt too


def test_negative_logits_are_multiplied_by_the_repetition_penalty() -> None:
    logits = torch.tensor([[-1.0, -1.5, -3.0]])
    req = request("a", prompt=[0], temperature=0.0, repetition_penalty=2.0)  # token 0: -1 * 2 = -2 < -1.5
    assert token(Sampler(torch.device("cpu")), logits, [req]) == 1


def test_top_k_sampling_never_leaves_the_top_k() -> None:
    logits = torch.tensor([[5.0, 4.9, 0.0, 0.0, 0.0]])
    sampler = Sampler(torch.device("cpu"))
    assert {token(sampler, logits, [request(f"r{i}", top_k=2, seed=i)]) for i in range(200)} == {0, 1}
    assert {token(sampler, logits, [request(f"m{i}", min_p=0.5, seed=i)]) for i in range(200)} == {0, 1}


def test_sampled_frequencies_follow_the_temperature() -> None:
    logits = torch.tensor([[0.0, math.log(3.0)]])
    sampler, req = Sampler(torch.device("cpu")), request("r", seed=123)
    ones = sum(token(sampler, logits, [req]) for _ in range(4000))
    assert abs(ones / 4000 - 0.75) < 0.03  # binomial sd ~0.007
    hot = request("h", temperature=2.0, seed=5)  # p(1) = sqrt(3) / (1 + sqrt(3)) = 0.634
    ones = sum(token(sampler, logits, [hot]) for _ in range(4000))
    assert abs(ones / 4000 - 0.634) < 0.03


def _draws(params: dict[str, object], rows: list[torch.Tensor], batch: int, position: int) -> list[int]:
    """12 steps of one seeded request among batch - 1 neighbours (some seeded, some greedy, some not)."""
    sampler, req, out = Sampler(torch.device("cpu")), request("x", **params), []
    others = [request(f"o{i}", seed=i if i % 3 == 0 else None, temperature=0.0 if i % 3 == 1 else 0.7,
                      top_k=5 if i % 2 else 0) for i in range(batch - 1)]
    for row in rows:
        reqs = [*others[:position], req, *others[position:]]
        logits = torch.randn(len(reqs), row.numel())  # the neighbours' rows differ every step
        logits[position] = row
        tok = token(sampler, logits, reqs, position)
        out.append(tok)
        req.output_ids.append(tok)
    return out


def test_same_seed_same_tokens_alone_and_anywhere_in_a_batch_of_32() -> None:
    gen = torch.Generator().manual_seed(1)
    rows = [torch.randn(40, generator=gen) for _ in range(12)]
    params: dict[str, object] = dict(temperature=1.0, top_p=0.9, seed=7)
    alone = _draws(params, rows, 1, 0)
    assert _draws(params, rows, 32, 0) == alone
    assert _draws(params, rows, 32, 17) == alone
    assert _draws(params, rows, 32, 31) == alone
    assert _draws(dict(temperature=1.0, top_p=0.9, seed=8), rows, 32, 5) != alone


def test_batched_filter_rows_equal_each_row_filtered_alone() -> None:
    torch.manual_seed(2)
    logits = torch.randn(6, 50)
    t = torch.tensor([0.5, 1.0, 1.3, 0.8, 1.0, 2.0])
    k, p, m = torch.tensor([0, 3, 10, 0, 49, 1.0]), torch.tensor([1.0, 0.9, 0.5, 0.3, 1.0, 0.99]), torch.rand(6) * 0.2
    batched = filter_logits(logits, t, k, p, m)
    for i in range(6):
        alone = filter_logits(logits[i : i + 1], t[i : i + 1], k[i : i + 1], p[i : i + 1], m[i : i + 1])[0]
        assert torch.equal(batched[i], alone), f"row {i} depends on the rest of the batch"


def test_seeded_sampling_matches_the_reference_decoder() -> None:
    """The engine's sampler and model.generate draw the same tokens from the same seed and model."""
    torch.manual_seed(0)
    model = build_model(preset("tiny-gpt", dropout=0.0, attn_dropout=0.0)).eval()
    prompt = [3, 5, 7]
    cfg = GenerationConfig(max_new_tokens=10, temperature=0.8, top_k=12, top_p=0.95, seed=99)
    expected = generate(model, prompt, cfg)  # type: ignore[arg-type]
    sampler, req = Sampler(torch.device("cpu")), request("x", prompt=prompt, temperature=0.8, top_k=12, top_p=0.95,
                                                         seed=99)
    with torch.no_grad():
        for _ in range(10):
            logits = model(torch.tensor([req.all_ids]))[:, -1].float()  # type: ignore[operator]
            req.output_ids.append(token(sampler, logits, [req]))
    assert req.output_ids == expected


def test_nan_logits_fail_only_their_row() -> None:
    logits = torch.tensor([[0.0, float("nan")], [0.0, 1.0], [float("-inf"), float("-inf")]])
    rows = run(Sampler(torch.device("cpu")), logits, [request("a"), request("b", temperature=0.0), request("c")])
    assert [r[1] for r in rows] == [1.0, 0.0, 1.0] and rows[1][0] == 1


def test_a_plain_greedy_batch_takes_the_same_tokens_as_the_full_path() -> None:
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(0))
    logits[2, 7], logits[4] = float("nan"), float("-inf")  # bad rows are flagged on both paths
    logits[0, [9, 3]] = 100.0  # a tie: the first index, as torch's max takes it
    plain = [request(str(i), temperature=0.0) for i in range(6)]  # all argmax as they are: the short path
    full = [*plain[:5], request("5", temperature=0.0, logprobs=0)]  # one row asks for logprobs: the full path
    fast, slow = (run(Sampler(torch.device("cpu")), logits, reqs) for reqs in (plain, full))
    no_kernel = Sampler(torch.device("cpu"))
    no_kernel.greedy_kernel = None  # the short path in torch's ops, where the C++ one is not built
    for rows in (fast, run(no_kernel, logits, plain)):
        assert [r[1] for r in rows] == [r[1] for r in slow] == [0, 0, 1, 0, 1, 0]  # a bad row's id is never read
        assert [int(r[0]) for r in rows if not r[1]] == [int(r[0]) for r in slow if not r[1]]
        assert [int(r[0]) for r in rows if not r[1]] == [int(i) for i in logits.argmax(-1)[[0, 1, 3, 5]]]
        assert rows[0][0] == 3


def test_release_forgets_the_generator() -> None:
    sampler, req = Sampler(torch.device("cpu")), request("x", seed=5)
    logits = torch.zeros(1, 1000)
    first = token(sampler, logits, [req])
    sampler.release("x")
    assert "x" not in sampler.generators
    assert token(sampler, logits, [req]) == first  # a fresh generator from the same seed

"""Prompt scoring in the engine's batch: prompt log-probs equal a direct forward pass (whole or chunked prefill,
alone or beside other requests), max_tokens 0 scores without generating, min_tokens holds EOS back, and a stop
string can be kept in the output."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import torch

from model.checkpoint import load_checkpoint
from service.engine.request import SamplingParams, StepOutput
from service.registry import ServedModel

pytestmark = pytest.mark.usefixtures("one_thread")


def run(served: ServedModel, prompts: list[str], params: list[SamplingParams]) -> list[list[StepOutput]]:
    async def one(i: int) -> list[StepOutput]:
        async with served.engine.open(served.make_request(f"s{i}", prompts[i], params[i])) as stream:
            return [o async for o in stream]

    async def main() -> list[list[StepOutput]]:
        return list(await asyncio.gather(*(one(i) for i in range(len(prompts)))))

    return asyncio.run(main())


def direct(checkpoints_dir: Path, ids: list[int]) -> torch.Tensor:
    """log p(token i | tokens < i) for i >= 1, from one plain forward of the same weights."""
    model = load_checkpoint(checkpoints_dir / "tiny-gpt").model.eval()
    with torch.no_grad():
        lp = model(torch.tensor([ids]))[0].float().log_softmax(-1)  # (T, V)
    return lp[:-1].gather(1, torch.tensor(ids[1:])[:, None])[:, 0]


@pytest.mark.parametrize("budget", [512, 4], ids=["whole", "chunked"])
def test_prompt_logprobs_equal_a_direct_forward(build: Any, checkpoints_dir: Path, budget: int) -> None:
    served = build(max_num_seqs=4, max_num_batched_tokens=budget)
    prompts = ["ROMEO: But soft, what light", "JULIET: O Romeo", "a b c"]
    score = SamplingParams(max_tokens=0, prompt_logprobs=2)
    other = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)
    outs = run(served, prompts, [score, other, SamplingParams(max_tokens=3, prompt_logprobs=0, ignore_eos=True)])
    scored = outs[0]
    assert len(scored) == 1 and scored[0].finished and scored[0].finish_reason == "length"
    assert scored[0].num_output_tokens == 0 and scored[0].token_id is None
    ids = served.tokenizer.encode(prompts[0])
    got = scored[0].prompt_logprobs
    assert got is not None and len(got) == len(ids) and got[0] is None
    expected = direct(checkpoints_dir, ids)
    for i, lp in enumerate(got[1:], start=1):
        assert lp is not None and lp.token_id == ids[i]
        assert abs(lp.logprob - expected[i - 1].item()) < 1e-4, i
        assert len(lp.top_logprobs) == 2 and lp.top_logprobs[0].logprob >= lp.logprob - 1e-6
    assert outs[1][0].prompt_logprobs is None  # not asked
    third = outs[2]
    assert third[0].prompt_logprobs is not None and len(third[0].prompt_logprobs) == len(served.tokenizer.encode("a b c"))
    assert all(o.prompt_logprobs is None for o in third[1:]), "prompt log-probs come with the first output only"
    assert sum(o.token_id is not None for o in third) == 3


def test_min_tokens_holds_eos_back(build: Any) -> None:
    served = build()
    eos = served.tokenizer.eos_id
    assert eos is not None
    # a bias that makes EOS the greedy choice at every step: without min_tokens the output would be empty
    head = served.engine.runner.model.generator
    bias = torch.zeros(head.weight.size(0))
    bias[eos] = 1e4
    head.bias = torch.nn.Parameter(bias)
    outs = run(served, ["ROMEO:", "ROMEO:"], [SamplingParams(max_tokens=8, temperature=0.0),
                                             SamplingParams(max_tokens=8, temperature=0.0, min_tokens=4)])
    assert [sum(o.token_id is not None for o in out) for out in outs] == [1, 5]  # + the EOS that ends each
    assert [[o.token_id for o in out if o.token_id is not None][-1] for out in outs] == [eos, eos]
    assert "".join(o.text for o in outs[0]) == ""
    assert outs[1][-1].finish_reason == "stop"


def test_the_stop_string_can_be_kept(build: Any) -> None:
    served = build()
    plain = "".join(o.text for o in run(served, ["ROMEO:"], [SamplingParams(max_tokens=12, temperature=0.0,
                                                                            ignore_eos=True)])[0])
    stop = plain[3:5]
    assert stop and stop in plain
    cut, kept = run(served, ["ROMEO:", "ROMEO:"], [
        SamplingParams(max_tokens=12, temperature=0.0, stop=(stop,), ignore_eos=True),
        SamplingParams(max_tokens=12, temperature=0.0, stop=(stop,), include_stop_str_in_output=True, ignore_eos=True)])
    first = plain.find(stop)
    assert "".join(o.text for o in cut) == plain[:first]
    assert "".join(o.text for o in kept) == plain[: first + len(stop)]

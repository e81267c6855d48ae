"""Prefix caching through the real engine and model: greedy tokens are the reference decoder's with and without
caching, alone (each request reusing the blocks of the one before) and in a batch (requests sharing blocks while
they decode, attention merged over their own and the shared keys); a translator shares only within one source;
preemption and aborts leave nothing held; the hit counter counts what was reused."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from model.checkpoint import load_checkpoint
from model.generate import GenerationConfig, generate
from service.engine.request import Request, SamplingParams, StepOutput
from service.registry import ServedModel

pytestmark = pytest.mark.usefixtures("one_thread")

HEAD = "ROMEO: What light through yonder window breaks? It is the east, "  # 64 characters: 16 blocks of 4
TAILS = ["and Juliet is the sun.", "and", "JULIET: O Romeo", "Arise, fair sun", "b"]
GREEDY = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)


async def _one(served: ServedModel, rid: str, prompt: str, params: SamplingParams,
               logprobs: list[list[float]] | None = None) -> list[int]:
    req = served.make_request(rid, prompt, params)
    async with served.engine.open(req) as stream:
        outs: list[StepOutput] = [o async for o in stream]
    assert outs[-1].finish_reason in ("length", "stop"), outs[-1]
    if logprobs is not None:
        logprobs.append([o.logprob for o in outs if o.logprob is not None])
    return [o.token_id for o in outs if o.token_id is not None]


def run(served: ServedModel, prompts: list[str], together: bool, params: SamplingParams = GREEDY,
        logprobs: list[list[float]] | None = None) -> list[list[int]]:
    async def main() -> list[list[int]]:
        if together:
            return list(await asyncio.gather(*(_one(served, f"r{i}", p, params, logprobs)
                                               for i, p in enumerate(prompts))))
        return [await _one(served, f"r{i}", p, params, logprobs) for i, p in enumerate(prompts)]

    return asyncio.run(main())


def settle(served: ServedModel) -> None:
    """Wait for the engine to take the last aborts, then check that every block and slot came back."""
    blocks = served.engine.blocks
    end = time.monotonic() + 5
    while (blocks.num_free != blocks.num_blocks or served.engine.scheduler.has_work()) and time.monotonic() < end:
        time.sleep(0.01)
    assert blocks.num_free == blocks.num_blocks and blocks.num_shared == 0
    assert blocks.num_free_slots == blocks.num_slots
    assert all(blocks.references(b) == 0 for b in range(blocks.num_blocks))


def reference(checkpoints_dir: Path, name: str, prompts: list[str], n: int = 10) -> list[list[int]]:
    ref = load_checkpoint(checkpoints_dir / name)
    return [generate(ref.model.eval(), ref.tokenizer.encode(p), GenerationConfig(max_new_tokens=n)) for p in prompts]


@pytest.mark.parametrize("together", [False, True], ids=["alone", "batched"])
def test_greedy_tokens_equal_the_reference_with_and_without_prefix_caching(build: Any, checkpoints_dir: Path,
                                                                           together: bool) -> None:
    prompts = [HEAD + t for t in TAILS] + [HEAD + TAILS[0]]  # the last one repeats the first whole
    expected = reference(checkpoints_dir, "tiny-gpt", prompts)
    cached, plain = build(enable_prefix_caching=True), build(enable_prefix_caching=False)
    with_lp = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True, logprobs=0)
    lp_plain: list[list[float]] = []
    lp_cached: list[list[float]] = []
    assert run(plain, prompts, together, with_lp, lp_plain) == expected
    assert run(cached, prompts, together, with_lp, lp_cached) == expected
    ordered = sorted(lp_plain), sorted(lp_cached)  # gathered in finishing order
    assert all(a == pytest.approx(b, abs=1e-4) for a, b in zip(*ordered, strict=True)), "log-probs differ"
    cache = cached.engine.blocks.cache
    assert cache is not None and plain.engine.blocks.cache is None
    assert cache.hits >= 5 * len(HEAD) - 4, "every request after the first reused the 64-character head"
    settle(cached)


def test_decode_rows_share_blocks_while_they_run(build: Any, checkpoints_dir: Path) -> None:
    """Requests arriving together wait one step for the head's blocks, then decode over them together."""
    served = build(enable_prefix_caching=True)
    shared: list[int] = []
    original = served.engine.scheduler.update

    def update(plan: Any, output: Any) -> Any:
        shared.append(served.engine.blocks.num_shared)
        return original(plan, output)

    served.engine.scheduler.update = update  # type: ignore[method-assign]
    prompts = [HEAD + t for t in TAILS]
    assert run(served, prompts, together=True) == reference(checkpoints_dir, "tiny-gpt", prompts)
    assert max(shared) >= len(HEAD) // 4 - 1, f"the head's blocks were never shared: {shared}"
    copies = served.engine.runner.pool.num_copies
    assert copies == served.engine.blocks.num_copied <= len(prompts), f"{copies} block copies for {len(prompts)} admissions"
    settle(served)


def test_n_choices_hold_their_prompt_once_and_sample_as_without_sharing(build: Any) -> None:
    """Four seeded choices of one 67-token prompt (16 full blocks of 4): the prompt's blocks are held once, each
    choice copies the block it diverges in, and every choice draws what it draws without prefix caching."""
    prompt = HEAD + "and"
    choices = [SamplingParams(max_tokens=10, temperature=0.9, seed=s, ignore_eos=True) for s in range(4)]

    def sample(served: ServedModel) -> tuple[list[list[int]], int, int]:
        seen = [(0, 0)]
        original = served.engine.scheduler.update

        def update(plan: Any, output: Any) -> Any:
            blocks = served.engine.blocks
            seen.append((blocks.num_blocks - blocks.num_free, blocks.num_shared))
            return original(plan, output)

        served.engine.scheduler.update = update  # type: ignore[method-assign]

        async def main() -> list[list[int]]:
            return list(await asyncio.gather(*(_one(served, f"c{i}", prompt, p) for i, p in enumerate(choices))))

        return asyncio.run(main()), max(u for u, _ in seen), max(sh for _, sh in seen)

    shared, used, most_shared = sample(build(enable_prefix_caching=True))
    alone, used_alone, _ = sample(build(enable_prefix_caching=False))
    assert shared == alone
    assert most_shared == 16, "the prompt's 16 full blocks were not shared by all four"
    # 67 + 9 tokens get K/V (the tenth is sampled, never fed): 19 blocks a choice, 3 of them its own
    assert used == 16 + 4 * 3 and used_alone == 4 * 19, (used, used_alone)
    assert len({tuple(t) for t in shared}) > 1, "the choices did not diverge"


def test_a_translator_shares_blocks_only_within_one_source(build: Any, checkpoints_dir: Path) -> None:
    served = build("tiny-mt", enable_prefix_caching=True)
    sources = ["Two dogs play in the snow.", "A man rides a bike.", "Two dogs play in the snow."]
    ref = load_checkpoint(checkpoints_dir / "tiny-mt")
    tok = ref.tokenizer
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    expected = [generate(ref.model.eval(), [tok.bos_id], GenerationConfig(max_new_tokens=12), source=tok.encode(s))
                for s in sources]
    assert run(served, sources, together=False, params=params) == expected
    assert run(served, sources, together=True, params=params) == expected
    settle(served)


def test_translator_rows_that_share_blocks_decode_beside_other_sources(build: Any, checkpoints_dir: Path) -> None:
    """Requests with one source and one forced decoder prefix share its blocks while a longer source decodes in
    the same steps: each row must still see only its own source (cross-attention masked to its length)."""
    served = build("tiny-mt", enable_prefix_caching=True)
    ref = load_checkpoint(checkpoints_dir / "tiny-mt")
    tok = ref.tokenizer
    prefix = [tok.bos_id or 0, *tok.encode("Zwei Hunde spielen")[:8]]
    jobs = [("Two dogs.", prefix), ("Two dogs.", prefix), ("A man rides a bike in the snow with two dogs.", prefix)]
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)

    async def one(i: int, source: str, prompt: list[int]) -> list[int]:
        req = Request(f"t{i}", list(prompt), params, source_ids=tok.encode(source))
        async with served.engine.open(req) as stream:
            return [o.token_id async for o in stream if o.token_id is not None]

    async def main() -> list[list[int]]:
        return list(await asyncio.gather(*(one(i, s, p) for i, (s, p) in enumerate(jobs))))

    expected = [generate(ref.model.eval(), p, GenerationConfig(max_new_tokens=10), source=tok.encode(s))
                for s, p in jobs]
    assert asyncio.run(main()) == expected
    assert served.engine.blocks.cache is not None and served.engine.blocks.cache.hits >= 8
    settle(served)


def test_preemption_and_aborts_with_shared_blocks_return_everything(build: Any, checkpoints_dir: Path) -> None:
    served = build(enable_prefix_caching=True, kv_cache_blocks=48, max_num_batched_tokens=32)
    prompts = [HEAD + t for t in TAILS] * 2
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)

    async def leave_early(i: int) -> None:
        req = served.make_request(f"gone{i}", HEAD + "x" * i, params)
        async with served.engine.open(req) as stream:
            async for _ in stream:
                break  # leaves after the first token: the request is aborted

    async def main() -> list[list[int]]:
        kept = asyncio.gather(*(_one(served, f"r{i}", p, params) for i, p in enumerate(prompts)))
        await asyncio.gather(*(leave_early(i) for i in range(4)))
        return list(await kept)

    got = asyncio.run(main())
    assert got == reference(checkpoints_dir, "tiny-gpt", prompts, 24)
    assert served.engine.scheduler.num_preemptions > 0, "the pool was never short"
    settle(served)

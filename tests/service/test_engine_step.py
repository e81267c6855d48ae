"""The engine step's shape: the same input storage every step, one host-device copy each way per step, chunked
prefill and padded decode buckets giving the same tokens as the plain path, a seeded request the same alone and
in a batch of 32, and (with CUDA) graphs equal to eager and bfloat16 close to the float32 reference."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from support import run_engine

from model import fused_step
from model.checkpoint import load_checkpoint
from model.generate import GenerationConfig, generate
from service.engine import threads as threads_module
from service.engine.cuda_graphs import DecodeGraphs
from service.engine.request import Constraint, SamplingParams
from service.registry import ServedModel

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = ["ROMEO: What light through yonder window", "a", "JULIET: O Romeo, Romeo, wherefore art thou Romeo?",
           "It is the east, and Juliet is the sun", "Two", "But soft"]
GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
def cuda(test: Any) -> Any:
    return pytest.mark.cuda(pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")(test))


def run(served: ServedModel, prompts: list[str], params: SamplingParams | list[SamplingParams] = GREEDY
        ) -> list[list[int]]:
    return run_engine(served, prompts, params if isinstance(params, list) else [params] * len(prompts))


def test_decode_inputs_are_the_same_storage_step_after_step(build: Any) -> None:
    served = build(start=False)
    runner, seen = served.engine.runner, set()
    decode = runner.model.decode

    def spy(tokens: torch.Tensor, positions: torch.Tensor, **kw: Any) -> torch.Tensor:
        seen.update({tokens.untyped_storage().data_ptr(), positions.untyped_storage().data_ptr(),
                     kw["cache"].layout.write_slots.untyped_storage().data_ptr()})
        return decode(tokens, positions, **kw)

    runner.model.decode = spy  # type: ignore[method-assign]
    if runner.fused is not None:  # the C++ step takes its tokens and positions here (model/fused_step.py)
        fused_inputs = runner.fused._inputs

        def spy_fused(tokens: torch.Tensor, positions: torch.Tensor) -> Any:
            seen.update({tokens.untyped_storage().data_ptr(), positions.untyped_storage().data_ptr()})
            return fused_inputs(tokens, positions)

        runner.fused._inputs = spy_fused  # type: ignore[method-assign]
    served.engine.start()
    run(served, PROMPTS)
    assert len(seen) == 1, f"the step's inputs moved between steps: {len(seen)} different storages"
    assert seen == {runner.inputs.dev.untyped_storage().data_ptr()}, "inputs are views of the one persistent buffer"


def count_transfers(served: ServedModel) -> list[tuple[int, int]]:
    """(host-to-device, device-to-host) copies of each step the engine runs from now on, in a list that fills."""
    runner, per_step = served.engine.runner, []
    execute = runner.execute

    def counted(plan: Any, copies: Any = None) -> Any:
        before = (runner.transfers.to_device, runner.transfers.to_host)
        out = execute(plan, copies)
        per_step.append((runner.transfers.to_device - before[0], runner.transfers.to_host - before[1]))
        return out

    runner.execute = counted  # type: ignore[method-assign]
    return per_step


def test_one_transfer_each_way_per_step(build: Any) -> None:
    served = build(start=False)
    per_step = count_transfers(served)
    served.engine.start()
    params = [GREEDY, SamplingParams(max_tokens=12, temperature=0.9, top_p=0.8, seed=3, logprobs=2, ignore_eos=True)]
    run(served, PROMPTS, params * 3)
    assert len(per_step) >= 12 and set(per_step) == {(1, 1)}, per_step


def test_grammar_masks_travel_with_the_step_inputs(build: Any) -> None:
    """Rows held to a grammar beside free ones: their bitmasks go to the device in the step's one copy."""
    served = build(start=False)
    per_step = count_transfers(served)
    served.engine.start()
    held = Constraint("regex", r"[a-z]{2,5}( [a-z]{2,5}){1,3}\.")

    async def one(i: int, prompt: str, params: SamplingParams, grammar: Any = None) -> str:
        async with served.engine.open(served.make_request(f"g{i}", prompt, params, grammar=grammar)) as stream:
            return "".join([o.text async for o in stream])

    async def main() -> list[str]:
        grammar = await served.grammar(held)
        constrained = SamplingParams(max_tokens=40, temperature=1.0, seed=1, constraint=held)
        return list(await asyncio.gather(*(one(i, p, constrained if i % 2 else GREEDY, grammar if i % 2 else None)
                                           for i, p in enumerate(PROMPTS))))

    texts = asyncio.run(main())
    assert all(re.fullmatch(held.spec, t) for t in texts[1::2]), texts
    assert len(per_step) >= 6 and set(per_step) == {(1, 1)}, per_step


def test_chunked_prefill_gives_the_one_piece_tokens(build: Any, checkpoints_dir: Path) -> None:
    whole = run(build(max_num_batched_tokens=512), PROMPTS)
    chunked_model = build(max_num_seqs=4, max_num_batched_tokens=4)  # a budget of 7 tokens a step: many chunks
    assert chunked_model.engine.scheduler.max_num_batched_tokens == 4
    assert run(chunked_model, PROMPTS) == whole
    ref = load_checkpoint(checkpoints_dir / "tiny-gpt")
    for prompt, got in zip(PROMPTS, whole, strict=True):
        ids = ref.tokenizer.encode(prompt)
        assert got == generate(ref.model.eval(), ids, GenerationConfig(max_new_tokens=12)), prompt


def test_padded_decode_buckets_give_the_plain_tokens(build: Any) -> None:
    plain = run(build(), PROMPTS)
    served = build(start=False)
    runner = served.engine.runner
    runner.graphs = DecodeGraphs(runner.forward_decode, runner.inputs, served.engine.config.max_num_seqs, 64, graphs=False)
    served.engine.start()
    assert run(served, PROMPTS) == plain
    assert runner.pool.k[:, runner.pool.null_block].abs().sum() > 0, "padding rows were meant to write to null"


def test_a_seeded_request_draws_the_same_tokens_alone_and_in_a_batch_of_32(build: Any) -> None:
    seeded = SamplingParams(max_tokens=10, temperature=1.0, top_k=20, seed=42, ignore_eos=True)
    alone = run(build(), ["ROMEO:"], seeded)[0]
    others = [SamplingParams(max_tokens=10, temperature=0.8, seed=i if i % 2 else None, ignore_eos=True)
              for i in range(31)]
    crowd = run(build(), ["JULIET:"] * 17 + ["ROMEO:"] + ["O"] * 14, [*others[:17], seeded, *others[17:]])
    assert crowd[17] == alone


@cuda
def test_cuda_graphs_equal_eager(build: Any) -> None:
    eager = run(build(device="cuda", enforce_eager=True), PROMPTS)
    graphs = build(device="cuda")
    assert graphs.engine.runner.graphs is not None
    assert run(graphs, PROMPTS) == eager
    assert graphs.engine.runner.graphs.graphs, "no graph was captured"


@cuda
def test_bfloat16_engine_stays_close_to_the_float32_reference(build: Any, checkpoints_dir: Path) -> None:
    served = build(device="cuda", dtype="bfloat16")
    got = run(served, PROMPTS)
    ref = load_checkpoint(checkpoints_dir / "tiny-gpt")
    same = 0
    for prompt, tokens in zip(PROMPTS, got, strict=True):
        expected = generate(ref.model.eval(), ref.tokenizer.encode(prompt), GenerationConfig(max_new_tokens=12))
        same += sum(a == b for a, b in zip(tokens, expected, strict=True))
    assert same >= 0.8 * 12 * len(PROMPTS), f"only {same} of {12 * len(PROMPTS)} tokens agree in bfloat16"


def test_the_fused_cpu_step_gives_the_eager_tokens_for_a_gpt(build: Any) -> None:
    """bfloat16 on a CPU: GPT-2's shape (LayerNorm, learned positions, GELU) through the one-call step
    (model/fused_step.py) = `--enforce-eager`, alone and batched."""
    if fused_step.kernel() is None:
        pytest.skip("no fused CPU step here (neither AVX-512 BF16 nor AVX2 + FMA, or no compiler)")
    got = {}
    for eager in (True, False):
        served = build(dtype="bfloat16", enforce_eager=eager)
        assert (served.engine.runner.fused is None) == eager, served.engine.runner.why_not_fused
        got[eager] = [run(served, PROMPTS), [run(served, [p])[0] for p in PROMPTS]]
    assert got[False] == got[True]


def test_preemption_under_chunked_prefill_keeps_the_reference_tokens(build: Any, checkpoints_dir: Path) -> None:
    """24 blocks of 4 tokens and a 6-token budget: prompts arrive in chunks, requests are preempted and
    recomputed (in chunks again), and every output still equals the reference decoder's."""
    served = build(kv_cache_blocks=24, max_num_seqs=3, max_num_batched_tokens=6)
    params = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
    got = run(served, PROMPTS, params)
    assert served.engine.scheduler.num_preemptions > 0
    assert served.engine.blocks.num_free == served.engine.blocks.num_blocks
    assert served.engine.blocks.num_free_slots == served.engine.blocks.num_slots
    ref = load_checkpoint(checkpoints_dir / "tiny-gpt")
    for prompt, tokens in zip(PROMPTS, got, strict=True):
        assert tokens == generate(ref.model.eval(), ref.tokenizer.encode(prompt), GenerationConfig(max_new_tokens=20))


def test_leaving_during_a_chunked_prefill_frees_its_blocks_and_slot(build: Any) -> None:
    served = build(max_num_seqs=2, max_num_batched_tokens=2)
    engine = served.engine

    async def main() -> None:
        req = served.make_request("leaver", "JULIET: O Romeo, Romeo, wherefore art thou Romeo?", GREEDY)
        async with engine.open(req):
            while req.num_computed == 0:  # leave once its first chunk is in, long before its prompt is
                await asyncio.sleep(0.0005)
            assert req.num_computed < len(req.prompt_ids)
        while engine.blocks.num_free_slots != engine.blocks.num_slots:
            await asyncio.sleep(0.001)

    asyncio.run(asyncio.wait_for(main(), 10))
    assert engine.blocks.num_free == engine.blocks.num_blocks and not engine.scheduler.has_work()


def test_a_short_step_or_a_fast_one_runs_on_one_thread(build: Any) -> None:
    """A step one core finishes within SPLIT_FROM_S, or whose outputs would come faster than SPLIT_TO_PER_S, runs
    on one thread (engine/threads.py's rule); a longer, slower one gets every thread the process has (and a
    prefill step, which is not measured, keeps them)."""
    torch.set_num_threads(2)
    try:
        runner = build(start=False).engine.runner
        assert runner.num_threads == 2
        bytes_per_s = threads_module.ONE_CORE_BYTES_PER_S
        runner._threads_for(1, 1, True)  # tiny-gpt's one-row step: microseconds
        assert torch.get_num_threads() == 1
        sizes = runner.threads  # the step's weight bytes, FLOPs per token and one core's FLOP/s
        rows = int(threads_module.SPLIT_FROM_S * sizes.flops_per_s / sizes.flops_per_token) + 1
        runner._threads_for(rows, 1, False)
        assert torch.get_num_threads() == 2
        fast = int(threads_module.SPLIT_TO_PER_S * (sizes.weight_bytes / bytes_per_s + rows * sizes.flops_per_token
                                                     / sizes.flops_per_s)) + 2
        runner._threads_for(rows, fast, False)  # as long, but as many outputs as rows: the frontend needs the core
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(1)

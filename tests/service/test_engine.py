"""The engine without HTTP: its thread, its asyncio streams, against the reference decoder of model/generate.py.

Each test builds an engine over a tiny checkpoint the way the registry does, starts its loop thread and talks
to it through `Engine.open` from an asyncio loop, as the routes do."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import settings_for, slow_steps

from model.checkpoint import Checkpoint, load_checkpoint
from model.generate import GenerationConfig, generate
from service.engine.engine import Engine
from service.engine.request import (
    EngineOverloaded,
    EngineStopped,
    Request,
    RequestStatus,
    RequestTooLong,
    SamplingParams,
    StepOutput,
)
from service.registry import ServedModel, build_served_model

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models on a shared CPU: one thread is faster

PROMPTS = ["ROMEO:", "JULIET: O Romeo, Romeo", "a", "Zwei Hunde spielen im Schnee.", "It is the east, and",
           "Two dogs play", "But soft, what light through yonder window breaks?", "O"]




@pytest.fixture
def served(checkpoints_dir: Path) -> Iterator[ServedModel]:
    """tiny-gpt (float32, 256 KV blocks of 4) with its engine loop running."""
    m = build_served_model(checkpoints_dir / "tiny-gpt", settings_for(checkpoints_dir, kv_cache_blocks=256))
    m.engine.start()
    yield m
    m.engine.stop()


@pytest.fixture(scope="module")
def reference(checkpoints_dir: Path) -> Checkpoint:
    return load_checkpoint(checkpoints_dir / "tiny-gpt")


async def collect(engine: Engine, req: Request) -> list[StepOutput]:
    async with engine.open(req) as stream:
        return [out async for out in stream]


def run_all(served: ServedModel, params: list[SamplingParams], prompts: list[str]) -> list[list[StepOutput]]:
    async def main() -> list[list[StepOutput]]:
        reqs = [served.make_request(f"r{i}", p, sp) for i, (p, sp) in enumerate(zip(prompts, params, strict=True))]
        return await asyncio.gather(*(collect(served.engine, r) for r in reqs))

    return asyncio.run(main())


def token_ids(outs: list[StepOutput]) -> list[int]:
    return [o.token_id for o in outs if o.token_id is not None]


def without_eos(ids: list[int], eos: int | None) -> list[int]:
    """The reference decoder stops before EOS; the engine keeps the EOS that ends an output as its last token."""
    return ids[:-1] if ids and ids[-1] == eos else ids


def test_concurrent_greedy_and_preempted_requests_equal_the_reference(reference: Checkpoint,
                                                                     checkpoints_dir: Path) -> None:
    """A pool of 32 blocks of 4 cannot hold 8 requests of up to 52 + 48 tokens: preemption and recompute."""
    m = build_served_model(checkpoints_dir / "tiny-gpt", settings_for(checkpoints_dir, kv_cache_blocks=32))
    m.engine.start()
    try:
        outs = run_all(m, [SamplingParams(max_tokens=48, temperature=0.0)] * len(PROMPTS), PROMPTS)
        assert m.engine.scheduler.num_preemptions > 0
        assert m.engine.blocks.num_free == m.engine.blocks.num_blocks
    finally:
        m.engine.stop()
    tok = reference.tokenizer
    for prompt, out in zip(PROMPTS, outs, strict=True):
        ref = generate(reference.model, tok.encode(prompt), GenerationConfig(max_new_tokens=48, eos_id=tok.eos_id))
        assert without_eos(token_ids(out), tok.eos_id) == ref, prompt
        assert "".join(o.text for o in out) == tok.decode(ref)


def test_seeded_sampling_equals_the_reference_decoder_at_any_load(served: ServedModel, reference: Checkpoint) -> None:
    params = [SamplingParams(max_tokens=30, temperature=1.0, top_p=0.9, seed=100 + i) for i in range(len(PROMPTS))]
    together = [token_ids(o) for o in run_all(served, params, PROMPTS)]
    tok = reference.tokenizer
    for i, prompt in enumerate(PROMPTS):
        cfg = GenerationConfig(max_new_tokens=30, temperature=1.0, top_p=0.9, seed=100 + i, eos_id=tok.eos_id)
        assert without_eos(together[i], tok.eos_id) == generate(reference.model, tok.encode(prompt), cfg), prompt
    alone = [token_ids(run_all(served, [p], [prompt])[0]) for p, prompt in zip(params[:3], PROMPTS, strict=False)]
    assert alone == together[:3]


def test_finish_reasons_and_the_final_output(served: ServedModel) -> None:
    base = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    (length,) = run_all(served, [base], ["ROMEO:"])
    ids = token_ids(length)
    assert len(ids) == 12 and length[-1].finished and length[-1].finish_reason == "length"
    assert [o.finished for o in length] == [False] * 12 + [True]
    assert length[-1].num_output_tokens == 12 and length[-1].num_prompt_tokens == len("ROMEO:")
    assert length[-1].ttft is not None and length[-1].e2e is not None and length[-1].e2e >= length[-1].ttft
    # a stop token ends the request as its last token (vLLM's): in the ids and counted, with no text
    stop_id = ids[5]
    first = ids.index(stop_id)
    (stopped,) = run_all(served, [SamplingParams(max_tokens=12, temperature=0.0, stop_token_ids=(stop_id,))],
                         ["ROMEO:"])
    assert token_ids(stopped) == ids[: first + 1] and stopped[-1].finish_reason == "stop"
    assert "".join(o.text for o in stopped) == served.tokenizer.decode(ids[:first])
    assert stopped[-1].num_output_tokens == first + 1
    # a stop string: the text ends before it
    text = served.tokenizer.decode(ids)
    stop = text[len(text) // 2 :][:2]
    (by_string,) = run_all(served, [SamplingParams(max_tokens=12, temperature=0.0, stop=(stop,))], ["ROMEO:"])
    assert "".join(o.text for o in by_string) == text[: text.index(stop)]
    assert by_string[-1].finish_reason == "stop"


def test_leaving_the_stream_aborts_and_frees_blocks_within_one_step(served: ServedModel) -> None:
    engine = served.engine

    async def main() -> tuple[int, Request]:
        req = served.make_request("leaver", "ROMEO:", SamplingParams(max_tokens=100, temperature=0.0,
                                                                     ignore_eos=True))
        async with engine.open(req) as stream:
            async for out in stream:
                if out.num_output_tokens >= 3:
                    break
        left_at = engine.iterations  # the abort is queued now
        deadline = time.monotonic() + 5
        while engine.blocks.num_free != engine.blocks.num_blocks:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.001)
        return engine.iterations - left_at, req

    iterations_after, req = asyncio.run(main())  # an iteration: one step, or one decode burst (engine/burst.py)
    assert iterations_after <= 1, f"{iterations_after} iterations ran after the abort"
    assert req.status == RequestStatus.FINISHED_ABORTED and len(req.output_ids) < 100
    time.sleep(0.05)
    assert not engine.scheduler.has_work()


def test_a_request_past_its_deadline_is_aborted(served: ServedModel) -> None:
    req = served.make_request("late", "ROMEO:", SamplingParams(max_tokens=50, temperature=0.0))
    req.deadline = time.monotonic() - 1.0
    outs = asyncio.run(collect(served.engine, req))
    assert outs[-1].finished and outs[-1].finish_reason == "abort" and outs[-1].error == "deadline exceeded"
    assert served.engine.blocks.num_free == served.engine.blocks.num_blocks


def test_check_refuses_what_can_never_run(served: ServedModel) -> None:
    limit = served.engine.config.max_model_len
    prompt = "a" * (limit - 4)
    with pytest.raises(RequestTooLong, match=f"maximum context length is {limit}"):
        served.engine.check(served.make_request("x", prompt, SamplingParams(max_tokens=5)))
    served.engine.check(served.make_request("x", prompt, SamplingParams(max_tokens=4)))  # exactly fits


def test_full_waiting_queue_is_refused_then_served(checkpoints_dir: Path) -> None:
    m = build_served_model(checkpoints_dir / "tiny-gpt",
                           settings_for(checkpoints_dir, kv_cache_blocks=64, max_waiting_requests=2))

    async def main() -> list[list[StepOutput]]:
        params = SamplingParams(max_tokens=3, temperature=0.0)
        streams = [m.engine.open(m.make_request(f"q{i}", "ROMEO:", params)) for i in range(2)]
        with pytest.raises(EngineOverloaded, match="limit 2"):
            m.engine.open(m.make_request("q2", "ROMEO:", params))
        m.engine.start()  # the loop was not running: nothing could leave the queue before
        outs = []
        for s in streams:
            async with s:
                outs.append([o async for o in s])
        return outs

    try:
        outs = asyncio.run(main())
    finally:
        m.engine.stop()
    assert [len(token_ids(o)) for o in outs] == [3, 3]


def test_a_failed_forward_fails_its_request_and_the_engine_goes_on(served: ServedModel) -> None:
    vocab = served.checkpoint.config.vocab_size
    bad = Request("bad", [vocab + 5], SamplingParams(max_tokens=4, temperature=0.0))  # no such embedding row
    outs = asyncio.run(collect(served.engine, bad))
    assert outs[-1].finish_reason == "error" and outs[-1].error
    assert served.engine.dead is None
    (good,) = run_all(served, [SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)], ["ROMEO:"])
    assert len(token_ids(good)) == 4 and good[-1].finish_reason == "length"
    assert served.engine.blocks.num_free == served.engine.blocks.num_blocks


def test_drain_finishes_or_aborts_in_flight_requests_and_refuses_new_ones(served: ServedModel) -> None:
    engine = served.engine
    slow_steps(engine, 0.01)  # 100 steps: > 1 s

    async def main() -> tuple[list[StepOutput], list[StepOutput]]:
        quick = asyncio.ensure_future(collect(engine, served.make_request(
            "quick", "a", SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True))))
        slow = asyncio.ensure_future(collect(engine, served.make_request(
            "slow", "a", SamplingParams(max_tokens=100, temperature=0.0, ignore_eos=True))))
        await asyncio.sleep(0.05)
        await engine.drain(timeout=0.3)
        with pytest.raises(EngineStopped):
            engine.open(served.make_request("late", "a", SamplingParams()))
        return await quick, await slow

    quick, slow = asyncio.run(main())
    assert quick[-1].finish_reason == "length" and slow[-1].finish_reason == "abort"
    assert engine.blocks.num_free == engine.blocks.num_blocks


def test_the_offline_engine_benchmark_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from benchmarks import engine_bench

    out = tmp_path / "bench.json"
    args = ["--preset", "tiny-gpt", "--batch-sizes", "1,3", "--input-len", "5", "--output-len", "6",
            "--dtype", "float32,bfloat16", "--no-progress", "--json", str(out)]
    assert engine_bench.main(args) == 0
    rows = json.loads(out.read_text())["results"]
    assert [(r["dtype"], r["batch"], r["tokens"]) for r in rows] == [
        ("float32", 1, 6), ("float32", 3, 18), ("bfloat16", 1, 6), ("bfloat16", 3, 18)]
    assert all(r["tokens_per_s"] > 0 and r["decode_step_ms_mean"] > 0 for r in rows)
    assert "tok/s" in capsys.readouterr().out

"""Decode bursts (service/engine/burst.py): several decode steps per engine iteration give the tokens of one
step per iteration (greedy: and of the reference decoder; sampled: the same seeded draws), stop where a request
ends or the KV blocks run out, never run for a row that asks a step for more than its token, and count each of
their steps in the step stats."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import zmq
from prometheus_client.parser import text_string_to_metric_families
from support import run_engine

from model.checkpoint import load_checkpoint
from model.generate import GenerationConfig, generate
from service.engine import wire
from service.engine.core import EngineCore
from service.engine.request import SamplingParams, StepStats

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = ["ROMEO: What light through yonder window", "a", "JULIET: O Romeo, Romeo, wherefore art thou Romeo?",
           "It is the east, and Juliet is the sun", "Two", "But soft"]
LENGTHS = [1, 2, 7, 12, 30, 45]  # requests end inside bursts, at their edges and after several


def greedy(n: int, ignore_eos: bool = True) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=ignore_eos)


def test_bursts_give_the_tokens_of_single_steps_and_of_the_reference(build: Any, checkpoints_dir: Path) -> None:
    params = [greedy(n) for n in LENGTHS]
    single, bursting = build(num_scheduler_steps=1), build(num_scheduler_steps=8)
    alone = [run_engine(bursting, [p], [q])[0] for p, q in zip(PROMPTS, params, strict=True)]  # one stream: long bursts
    assert bursting.engine.burst.inner > 0, "no burst ran"
    together = run_engine(bursting, PROMPTS, params)
    assert together == alone == run_engine(single, PROMPTS, params)
    assert single.engine.burst.inner == 0
    ref = load_checkpoint(checkpoints_dir / "tiny-gpt")
    for prompt, n, got in zip(PROMPTS, LENGTHS, alone, strict=True):
        assert got == generate(ref.model.eval(), ref.tokenizer.encode(prompt), GenerationConfig(max_new_tokens=n))
    blocks = bursting.engine.blocks
    assert blocks.num_free == blocks.num_blocks and not bursting.engine.scheduler.running, "a burst kept blocks"


def test_a_burst_stops_at_the_first_eos_and_where_no_block_is_free(build: Any) -> None:
    stops = [greedy(60, ignore_eos=False) for _ in PROMPTS]  # tiny-gpt's random weights reach its EOS at times
    assert run_engine(build(num_scheduler_steps=8), PROMPTS, stops) == run_engine(build(num_scheduler_steps=1), PROMPTS, stops)
    # 30 blocks of 4 tokens for six requests of 41-90 tokens: blocks run out, requests are preempted and recomputed
    tight = {"kv_cache_blocks": 30, "max_num_seqs": 6}
    few = build(num_scheduler_steps=8, **tight)
    params = [greedy(40) for _ in PROMPTS]
    assert run_engine(few, PROMPTS, params) == run_engine(build(num_scheduler_steps=1, **tight), PROMPTS, params)
    assert few.engine.scheduler.num_preemptions > 0 and few.engine.burst.inner > 0
    assert few.engine.blocks.num_free == few.engine.blocks.num_blocks


def test_sampled_rows_burst_with_the_tokens_of_single_steps(build: Any) -> None:
    """Seeds, temperature, top-k/p, min-p and penalties are the sampler's in a burst as in a single step."""
    params = [SamplingParams(max_tokens=30, temperature=0.8, top_p=0.9, seed=5, ignore_eos=True),
              SamplingParams(max_tokens=30, temperature=1.2, top_k=5, min_p=0.05, seed=6, ignore_eos=True),
              SamplingParams(max_tokens=30, temperature=0.0, repetition_penalty=1.3, frequency_penalty=0.5,
                             ignore_eos=True),
              SamplingParams(max_tokens=30, temperature=0.7, presence_penalty=0.4, seed=7, min_tokens=25),
              greedy(30), SamplingParams(max_tokens=30, temperature=0.9, seed=8, ignore_eos=True)]
    bursting = build(num_scheduler_steps=8)
    alone = [run_engine(bursting, PROMPTS[:1], params[:1])[0]]
    assert bursting.engine.burst.inner > 0, "a sampled row did not burst"
    alone += [run_engine(bursting, [p], [q])[0] for p, q in zip(PROMPTS[1:], params[1:], strict=True)]
    assert alone == run_engine(bursting, PROMPTS, params) == run_engine(build(num_scheduler_steps=1), PROMPTS, params)


def test_rows_that_ask_for_more_than_a_token_never_burst(build: Any) -> None:
    served = build(num_scheduler_steps=8)
    with_logprobs = SamplingParams(max_tokens=20, temperature=0.0, logprobs=2, ignore_eos=True)
    scored = SamplingParams(max_tokens=20, temperature=0.0, prompt_logprobs=1, ignore_eos=True)
    for params in (with_logprobs, scored):
        run_engine(served, PROMPTS[:2], [params, params])
        run_engine(served, PROMPTS[:2], [params, greedy(20)])  # one such row keeps the whole batch to single steps
    assert served.engine.burst.inner == 0


def test_each_step_of_a_burst_is_counted(build: Any) -> None:
    stats: list[StepStats] = []
    served = build(start=False, num_scheduler_steps=8)
    served.engine.on_step = stats.append
    served.engine.start()
    (tokens,) = run_engine(served, PROMPTS[:1], [greedy(40)])
    served.engine.stop()  # the last step's stats follow its outputs
    assert len(tokens) == 40 and served.engine.burst.inner > 0
    assert sum(s.steps for s in stats) == 40 == served.engine.steps  # one prefill step, 39 decode steps
    assert sum(s.num_decode_tokens for s in stats) == 39
    assert len(stats) < 40


@pytest.mark.parametrize("in_process", [True, False], ids=["engine-thread", "engine-process"])
def test_the_step_metrics_count_each_step_of_a_burst(make_server: Callable[..., Any], in_process: bool) -> None:
    server = make_server(engine_in_process=in_process, enable_prefix_caching=False)
    body = {"model": "tiny-gpt", "prompt": "ROMEO:", "max_tokens": 40, "temperature": 0, "ignore_eos": True}
    for _ in range(3):
        assert len(httpx.post(f"{server.url}/v1/generate", json=body, timeout=60).json()["token_ids"]) == 40
    deadline = time.monotonic() + 10
    while True:  # a step's stats reach the metrics just after its outputs
        m = {s.name: s.value for f in text_string_to_metric_families(httpx.get(f"{server.url}/metrics").text)
             for s in f.samples if s.labels.get("model") == "tiny-gpt"}
        if m["attnserve_step_time_seconds_count"] == 120 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert m["attnserve_step_time_seconds_count"] == m["attnserve_iteration_tokens_count"] == 3 * 40
    assert m["attnserve_decode_step_time_seconds_count"] == 3 * 39 and m["attnserve_prefill_step_time_seconds_count"] == 3
    assert m["attnserve_iteration_tokens_sum"] == 3 * (len("ROMEO:") + 39)


def test_a_message_for_the_loop_ends_a_burst(build: Any, tmp_path: Path) -> None:
    """A new request, an abort or an inspection ends a burst at once (`interrupted`): on the engine's thread, any
    item in its inbox; in a core process, a message on any frontend's socket. A burst then runs no inner step."""
    served = build(num_scheduler_steps=8, max_burst_ms=1000.0)
    burst = served.engine.burst
    burst.interrupted = lambda: True
    assert run_engine(served, PROMPTS[:1], [greedy(30)]) == run_engine(build(num_scheduler_steps=1), PROMPTS[:1],
                                                                       [greedy(30)])
    assert burst.inner == 0

    engine = build(start=False, num_scheduler_steps=8).engine
    assert not engine.burst.interrupted()
    engine.abort("nobody")
    assert engine.burst.interrupted()
    engine._take_inbox()
    assert not engine.burst.interrupted()

    context = zmq.Context()
    to_core, from_core = f"ipc://{tmp_path}/in", f"ipc://{tmp_path}/out"
    push, pull = context.socket(zmq.PUSH), context.socket(zmq.PULL)
    push.bind(to_core)
    pull.bind(from_core)
    core = EngineCore(engine, [(to_core, from_core)])
    try:
        assert not engine.burst.interrupted()
        push.send(wire.encode(wire.Abort(["nobody"], False)))
        deadline = time.monotonic() + 5
        while not engine.burst.interrupted() and time.monotonic() < deadline:
            time.sleep(0.001)
        assert engine.burst.interrupted()
        core._take_messages(0)
        assert not engine.burst.interrupted()
    finally:
        core.close()
        context.destroy(linger=0)


def test_a_burst_handed_over_at_once_is_not_a_slow_reader(build: Any) -> None:
    """A burst hands a stream up to --num-scheduler-steps outputs at once: a reader that keeps up is never taken
    for one that fell --max-stream-backlog behind (the backlog is counted before each hand-over)."""
    served = build(num_scheduler_steps=32, max_stream_backlog=4, max_burst_ms=1000.0)
    (tokens,) = run_engine(served, PROMPTS[:1], [greedy(60)])
    assert len(tokens) == 60 and served.engine.burst.inner > 8 * served.engine.iterations // 10
    assert served.engine.overflows == 0

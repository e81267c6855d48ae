"""The scheduler on the CPU, no model: admission, preemption, block accounting, disjoint block tables.

A fake runner plays the engine's `update`: every scheduled request gets its tokens computed and one new token;
a request stops at max_tokens. After every step the block tables must be disjoint and, with the free list,
account for every block of the pool."""

from __future__ import annotations

import random
import subprocess
import sys
from collections.abc import Iterable

from service.engine.request import Request, RequestStatus, SamplingParams
from service.engine.scheduler import BlockManager, Scheduler, SchedulerOutput


def make_request(rid: str, prompt_len: int, max_tokens: int = 8, arrival: float = 0.0,
                 source_len: int | None = None) -> Request:
    source = list(range(source_len)) if source_len is not None else None
    return Request(rid, list(range(1, prompt_len + 1)), SamplingParams(max_tokens=max_tokens), source_ids=source,
                   arrival_time=arrival)


def check_blocks(sched: Scheduler) -> None:
    """Running requests own disjoint blocks; held + free = the whole pool, each block exactly once."""
    held: list[int] = []
    for req in sched.running:
        held += req.block_ids + req.cross_block_ids
    for req in sched.waiting:
        assert not req.block_ids and not req.cross_block_ids, f"{req.request_id} waits while holding blocks"
    assert len(held) == len(set(held)), f"two requests share a block: {sorted(held)}"
    free = list(sched.blocks._free)
    assert not set(held) & set(free), "a held block is also on the free list"
    assert sorted(held + free) == list(range(sched.blocks.num_blocks))


def fake_execute(sched: Scheduler, plan: SchedulerOutput, token: int = 7) -> list[Request]:
    """What the engine does after a forward: mark tokens computed, append one, finish at max_tokens."""
    finished = []
    for s in plan.prefills + plan.decodes:
        req = s.request
        # the request's blocks cover every position it feeds now
        assert len(req.block_ids) * sched.blocks.block_size >= s.start + s.num_new
        assert s.start == req.num_computed
        req.num_computed = s.start + s.num_new
        req.output_ids.append(token)
        if len(req.output_ids) >= req.params.max_tokens:
            sched.finish(req, RequestStatus.FINISHED_LENGTH)
            finished.append(req)
    return finished


def run_to_end(sched: Scheduler, max_steps: int = 10_000) -> int:
    steps = 0
    while sched.has_work():
        plan = sched.schedule()
        check_blocks(sched)
        assert not plan.is_empty, "work is queued but nothing was scheduled (deadlock)"
        fake_execute(sched, plan)
        check_blocks(sched)
        steps += 1
        assert steps < max_steps
    return steps


def add_all(sched: Scheduler, reqs: Iterable[Request]) -> None:
    for r in reqs:
        sched.add(r)


def test_admission_stops_when_blocks_run_out() -> None:
    sched = Scheduler(BlockManager(10, 4))
    reqs = [make_request(f"r{i}", 10, arrival=i) for i in range(4)]  # each needs ceil(11 / 4) = 3 blocks
    add_all(sched, reqs)
    plan = sched.schedule()
    assert [s.request.request_id for s in plan.prefills] == ["r0", "r1", "r2"]
    assert all(s.start == 0 and s.num_new == 10 for s in plan.prefills)
    assert [r.request_id for r in sched.waiting] == ["r3"] and sched.blocks.num_free == 1
    assert all(r.status == RequestStatus.RUNNING for r in reqs[:3]) and reqs[3].status == RequestStatus.WAITING
    check_blocks(sched)


def test_admission_respects_max_num_seqs() -> None:
    sched = Scheduler(BlockManager(100, 4), max_num_seqs=2)
    add_all(sched, [make_request(f"r{i}", 3, arrival=i) for i in range(5)])
    plan = sched.schedule()
    assert len(plan.prefills) == 2 and len(sched.running) == 2 and len(sched.waiting) == 3
    fake_execute(sched, plan)
    plan = sched.schedule()
    assert len(plan.decodes) == 2 and not plan.prefills  # seats are full: nobody new joins


def test_admission_respects_token_budget() -> None:
    sched = Scheduler(BlockManager(100, 4), max_num_batched_tokens=16)
    add_all(sched, [make_request("a", 10, arrival=0), make_request("b", 10, arrival=1), make_request("c", 5, arrival=2)])
    plan = sched.schedule()
    assert [s.request.request_id for s in plan.prefills] == ["a"]  # b (10) would exceed 16; FCFS keeps c behind b
    assert plan.num_tokens == 10
    fake_execute(sched, plan)
    plan = sched.schedule()  # a decodes (1 token), b prefills (10), c (5): exactly the budget of 16
    assert [s.request.request_id for s in plan.decodes] == ["a"]
    assert [s.request.request_id for s in plan.prefills] == ["b", "c"]
    assert plan.num_tokens == 16


def test_a_prompt_over_the_budget_still_runs_alone() -> None:
    sched = Scheduler(BlockManager(100, 4), max_num_batched_tokens=8)
    add_all(sched, [make_request("long", 20, arrival=0), make_request("short", 2, arrival=1)])
    plan = sched.schedule()
    assert [s.request.request_id for s in plan.prefills] == ["long"]  # never starved by the budget
    assert run_to_end(sched) > 0


def test_preempts_the_most_recent_request_when_blocks_run_out() -> None:
    # 4 blocks of 4: two requests of 7 prompt tokens take 2 blocks each (8 slots for 7 + 1 tokens).
    sched = Scheduler(BlockManager(4, 4))
    old, new = make_request("old", 7, max_tokens=8, arrival=0), make_request("new", 7, max_tokens=8, arrival=1)
    add_all(sched, [old, new])
    fake_execute(sched, sched.schedule())  # prefill both (positions 0-6), 2 blocks each: the pool is full
    assert sched.blocks.num_free == 0
    plan = sched.schedule()  # both decode position 7, still in their second block
    assert len(plan.decodes) == 2 and not plan.preempted
    fake_execute(sched, plan)
    plan = sched.schedule()  # position 8 needs a third block each; only the older keeps running
    assert plan.preempted == [new] and [s.request for s in plan.decodes] == [old]
    assert new.status == RequestStatus.PREEMPTED and new.num_computed == 0 and not new.block_ids
    assert new.num_preemptions == 1 and sched.num_preemptions == 1
    assert list(sched.waiting) == [new] and len(old.block_ids) == 3
    check_blocks(sched)
    fake_execute(sched, plan)
    # it waits while the older one runs on, then recomputes its whole sequence (prompt + its 2 tokens)
    while sched.running:
        plan = sched.schedule()
        assert not plan.prefills and not plan.preempted
        fake_execute(sched, plan)
        check_blocks(sched)
    plan = sched.schedule()
    assert [s.request for s in plan.prefills] == [new]
    assert plan.prefills[0].start == 0 and plan.prefills[0].num_new == new.num_tokens == 9
    fake_execute(sched, plan)
    run_to_end(sched)
    assert len(new.output_ids) == len(old.output_ids) == 8
    assert sched.blocks.num_free == 4


def test_encoder_decoder_requests_hold_cross_attention_blocks() -> None:
    sched = Scheduler(BlockManager(8, 4))
    req = make_request("mt", 1, max_tokens=6, source_len=9)  # 3 blocks of encoder K/V + ceil(2 / 4) = 1
    assert sched.blocks_needed(req) == 4 and sched.fits_at_all(req)
    sched.add(req)
    plan = sched.schedule()
    assert plan.prefills[0].encode_source and len(req.cross_block_ids) == 3 and len(req.block_ids) == 1
    check_blocks(sched)
    run_to_end(sched)
    assert sched.blocks.num_free == 8
    assert not sched.fits_at_all(make_request("huge", 1, source_len=40))


def test_blocks_come_back_after_finish_and_abort() -> None:
    sched = Scheduler(BlockManager(16, 4))
    reqs = [make_request(f"r{i}", 5, max_tokens=10, arrival=i) for i in range(10)]  # 8 fit, 2 wait
    add_all(sched, reqs)
    fake_execute(sched, sched.schedule())
    running, waiting = sched.running[0], sched.waiting[-1]
    sched.finish(running, RequestStatus.FINISHED_ABORTED)  # abort while running
    sched.finish(waiting, RequestStatus.FINISHED_ABORTED)  # abort while waiting
    assert running.status == waiting.status == RequestStatus.FINISHED_ABORTED
    assert not running.block_ids and running not in sched.running and waiting not in sched.waiting
    check_blocks(sched)
    run_to_end(sched)
    assert sched.blocks.num_free == 16 and not sched.running and not sched.waiting


def test_random_load_never_shares_blocks_and_returns_them_all() -> None:
    """Arrivals, aborts, preemptions at random; the invariants hold after every step."""
    rng = random.Random(0)
    sched = Scheduler(BlockManager(24, 4), max_num_seqs=6, max_num_batched_tokens=40)
    arrived: list[Request] = []
    step = 0
    while step < 2000 and (step < 200 or sched.has_work()):
        if step < 200 and rng.random() < 0.4:
            src = rng.randint(1, 12) if rng.random() < 0.3 else None
            req = make_request(f"r{step}", rng.randint(1, 30), max_tokens=rng.randint(1, 40), arrival=step,
                               source_len=src)
            if sched.fits_at_all(make_request("probe", req.num_tokens + req.params.max_tokens, source_len=src)):
                sched.add(req)
                arrived.append(req)
        live = list(sched.running) + list(sched.waiting)
        if live and rng.random() < 0.05:
            sched.finish(rng.choice(live), RequestStatus.FINISHED_ABORTED)
        plan = sched.schedule()
        check_blocks(sched)
        assert len(sched.running) <= 6
        assert not (sched.has_work() and plan.is_empty), "work is queued but nothing was scheduled"
        fake_execute(sched, plan)
        check_blocks(sched)
        step += 1
    assert not sched.has_work(), "requests were left behind"
    assert sched.blocks.num_free == 24
    assert sched.num_preemptions > 0, "the load was meant to cause preemptions"
    for req in arrived:
        assert req.status.is_finished and not req.block_ids and not req.cross_block_ids
        if req.status == RequestStatus.FINISHED_LENGTH:
            assert len(req.output_ids) == req.params.max_tokens


def test_scheduler_imports_no_torch_and_no_web_framework() -> None:
    code = "import sys, service.engine.scheduler; print(sorted({'torch', 'fastapi', 'starlette'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"

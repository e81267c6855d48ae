"""The scheduler on the CPU, no model: admission, chunked prefill, preemption, slots and block accounting, and
the token-level stops of `update()`.

A fake runner returns a `ModelOutput` with one token for every request whose chunk reaches its last token, as
the real runner does. After every step the running requests' blocks and slots must be disjoint, and held + free
must account for the whole budget."""

from __future__ import annotations

import random
import subprocess
import sys
from collections.abc import Iterable

import pytest

from service.engine.blocks import BlockManager, BlockTable
from service.engine.request import ModelOutput, Request, RequestStatus, SamplingParams
from service.engine.scheduler import Scheduler, SchedulerOutput


def make_request(rid: str, prompt_len: int, max_tokens: int = 8, arrival: float = 0.0,
                 source_len: int | None = None, **params: object) -> Request:
    source = list(range(source_len)) if source_len is not None else None
    return Request(rid, list(range(1, prompt_len + 1)), SamplingParams(max_tokens=max_tokens, **params),  # type: ignore[arg-type]
                   source_ids=source, arrival_time=arrival)


def check_blocks(sched: Scheduler) -> None:
    """Running requests hold disjoint blocks and slots; held + free = the budget."""
    blocks = sched.blocks
    held: list[int] = []
    slots = [blocks.slot(r) for r in sched.running]
    assert None not in slots and len(set(slots)) == len(slots), f"slots {slots}"
    for req in sched.running:
        assert all(0 <= b < blocks.num_blocks for b in blocks.block_ids(req))
        held += blocks.block_ids(req)
    for req in sched.waiting:
        assert not blocks.holds(req), f"{req.request_id} waits holding"
    assert len(held) == len(set(held)), f"two requests share a block: {sorted(held)}"
    cross = sum(blocks.table(r).num_cross_blocks for r in sched.running)
    assert len(held) + cross + blocks.num_free == blocks.num_blocks
    assert blocks.num_free_slots + len(sched.running) == blocks.num_slots


def fake_execute(sched: Scheduler, plan: SchedulerOutput, token: int = 7) -> list[Request]:
    """What the engine does after a forward: the scheduler's update with one token per sampling request."""
    for s in plan.scheduled:
        assert s.table is sched.blocks.table(s.request)
        assert len(s.table.block_ids) * sched.blocks.block_size >= s.start + s.num_new, "blocks do not cover it"
        assert s.start == s.request.num_computed
    output = ModelOutput([token if s.samples else -1 for s in plan.scheduled])
    return [r.request for r in sched.update(plan, output) if r.finished is not None]


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


def ids(plan: SchedulerOutput) -> list[str]:
    return [s.request.request_id for s in plan.scheduled]


def test_admission_stops_when_blocks_run_out() -> None:
    sched = Scheduler(BlockManager(10, 4))
    reqs = [make_request(f"r{i}", 10, arrival=i) for i in range(4)]  # each needs ceil(10 / 4) = 3 blocks
    add_all(sched, reqs)
    plan = sched.schedule()
    assert ids(plan) == ["r0", "r1", "r2"] and all(s.start == 0 and s.num_new == 10 for s in plan.scheduled)
    assert [r.request_id for r in sched.waiting] == ["r3"] and sched.blocks.num_free == 1
    assert all(r.status == RequestStatus.RUNNING for r in reqs[:3]) and reqs[3].status == RequestStatus.WAITING
    assert [sched.blocks.slot(r) for r in reqs[:3]] == [0, 1, 2]
    check_blocks(sched)


def test_admission_respects_max_num_seqs_and_slots() -> None:
    sched = Scheduler(BlockManager(100, 4, num_slots=3), max_num_seqs=8)
    assert sched.max_num_seqs == 3  # no more requests than slots
    add_all(sched, [make_request(f"r{i}", 3, arrival=i) for i in range(5)])
    plan = sched.schedule()
    assert len(plan.scheduled) == 3 and len(sched.running) == 3 and len(sched.waiting) == 2
    fake_execute(sched, plan)
    plan = sched.schedule()
    assert all(s.is_decode for s in plan.scheduled) and len(plan.scheduled) == 3  # slots full: nobody joins


def test_the_lowest_free_slot_is_taken_first() -> None:
    sched = Scheduler(BlockManager(100, 4, num_slots=4))
    a, b, c = (make_request(n, 3, arrival=i) for i, n in enumerate("abc"))
    add_all(sched, [a, b, c])
    fake_execute(sched, sched.schedule())
    sched.finish(a, RequestStatus.FINISHED_ABORTED)
    d = make_request("d", 3, arrival=5)
    sched.add(d)
    sched.schedule()
    assert [sched.blocks.slot(r) for r in (d, b, c)] == [0, 1, 2]
    check_blocks(sched)


def test_a_long_prompt_is_prefilled_in_chunks_while_others_decode() -> None:
    sched = Scheduler(BlockManager(100, 4), max_num_seqs=4, max_num_batched_tokens=16)
    short, long = make_request("short", 4, max_tokens=20, arrival=0), make_request("long", 40, arrival=1)
    add_all(sched, [short, long])
    plan = sched.schedule()
    assert [(s.request.request_id, s.start, s.num_new) for s in plan.scheduled] == [("short", 0, 4), ("long", 0, 12)]
    assert not plan.scheduled[1].samples  # a chunk short of the prompt's end samples nothing
    fake_execute(sched, plan)
    assert long.num_computed == 12 and not long.output_ids and len(short.output_ids) == 1
    chunks = []
    while not long.output_ids:
        plan = sched.schedule()
        assert plan.num_tokens <= 16 and plan.scheduled[0].request is short and plan.scheduled[0].is_decode
        chunks += [(s.start, s.num_new) for s in plan.scheduled if s.request is long]
        fake_execute(sched, plan)
    assert chunks == [(12, 15), (27, 13)]  # the decode takes 1 of each step's 16 tokens
    run_to_end(sched)


def test_preempts_the_most_recent_request_when_blocks_run_out() -> None:
    # 4 blocks of 4: two requests of 7 prompt tokens take 2 blocks each.
    sched = Scheduler(BlockManager(4, 4))
    old, new = make_request("old", 7, max_tokens=8, arrival=0), make_request("new", 7, max_tokens=8, arrival=1)
    add_all(sched, [old, new])
    fake_execute(sched, sched.schedule())  # prefill both (positions 0-6) and sample position 7
    assert sched.blocks.num_free == 0
    plan = sched.schedule()  # both feed position 7, still in their second block
    assert len(plan.scheduled) == 2 and not plan.preempted
    fake_execute(sched, plan)
    plan = sched.schedule()  # position 8 needs a third block each; only the older keeps running
    assert plan.preempted == [new] and [s.request for s in plan.scheduled] == [old]
    assert new.status == RequestStatus.PREEMPTED and new.num_computed == 0 and not sched.blocks.holds(new)
    assert new.num_preemptions == 1 and sched.num_preemptions == 1 and sched.blocks.slot(new) is None
    assert list(sched.waiting) == [new] and len(sched.blocks.block_ids(old)) == 3
    check_blocks(sched)
    fake_execute(sched, plan)
    while sched.running:  # it waits while the older one runs on, then recomputes prompt + its 2 tokens
        plan = sched.schedule()
        assert ids(plan) == ["old"] and not plan.preempted
        fake_execute(sched, plan)
        check_blocks(sched)
    plan = sched.schedule()
    assert [(s.request, s.start, s.num_new) for s in plan.scheduled] == [(new, 0, 9)] and new.num_tokens == 9
    fake_execute(sched, plan)
    run_to_end(sched)
    assert len(new.output_ids) == len(old.output_ids) == 8
    assert sched.blocks.num_free == 4


def test_encoder_decoder_requests_hold_cross_attention_blocks() -> None:
    sched = Scheduler(BlockManager(8, 4))
    req = make_request("mt", 1, max_tokens=6, source_len=9)  # 3 blocks of encoder K/V + 1
    assert sched.blocks_needed(req) == 4
    sched.add(req)
    plan = sched.schedule()
    table = sched.blocks.table(req)
    assert plan.scheduled[0].encode_source and table.num_cross_blocks == 3 and len(table.block_ids) == 1
    check_blocks(sched)
    run_to_end(sched)
    assert sched.blocks.num_free == 8


def test_update_applies_eos_stop_ids_max_tokens_and_context() -> None:
    sched = Scheduler(BlockManager(100, 4), eos_id=2, max_model_len=12)
    eos, stop_id, ignore = make_request("eos", 3), make_request("stop", 3, stop_token_ids=(9,)), make_request(
        "ignore", 3, ignore_eos=True)
    length, ctx = make_request("len", 3, max_tokens=1), make_request("ctx", 11, max_tokens=50)
    add_all(sched, [eos, stop_id, ignore, length, ctx])
    plan = sched.schedule()
    got = sched.update(plan, ModelOutput([2, 9, 2, 5, 5]))
    assert [(r.request.request_id, r.token, r.finished) for r in got] == [
        ("eos", 2, RequestStatus.FINISHED_STOPPED), ("stop", 9, RequestStatus.FINISHED_STOPPED),
        ("ignore", 2, None), ("len", 5, RequestStatus.FINISHED_LENGTH), ("ctx", 5, RequestStatus.FINISHED_LENGTH)]
    assert eos.output_ids == [2] and ignore.output_ids == [2] and [r.request_id for r in sched.running] == ["ignore"]
    assert sched.blocks.num_free == 100 - len(sched.blocks.block_ids(ignore))


def test_update_fails_only_the_row_with_an_error() -> None:
    sched = Scheduler(BlockManager(100, 4))
    a, b = make_request("a", 3), make_request("b", 3)
    add_all(sched, [a, b])
    got = sched.update(sched.schedule(), ModelOutput([-1, 4], errors=["NaN logits", None]))
    assert (got[0].finished, got[0].error) == (RequestStatus.FINISHED_ERROR, "NaN logits") and got[1].token == 4
    assert a.status == RequestStatus.FINISHED_ERROR and sched.running == [b]


def test_blocks_come_back_after_finish_and_abort() -> None:
    sched = Scheduler(BlockManager(16, 4))
    reqs = [make_request(f"r{i}", 5, max_tokens=10, arrival=i) for i in range(10)]  # 8 fit, 2 wait
    add_all(sched, reqs)
    fake_execute(sched, sched.schedule())
    running, waiting = sched.running[0], sched.waiting[-1]
    sched.finish(running, RequestStatus.FINISHED_ABORTED)  # abort while running
    sched.finish(waiting, RequestStatus.FINISHED_ABORTED)  # abort while waiting
    assert running.status == waiting.status == RequestStatus.FINISHED_ABORTED
    assert not sched.blocks.holds(running) and running not in sched.running and waiting not in sched.waiting
    check_blocks(sched)
    run_to_end(sched)
    assert sched.blocks.num_free == 16 and not sched.running and not sched.waiting


@pytest.mark.parametrize("prefix_caching", [False, True])
def test_the_block_manager_keeps_nothing_of_requests_that_left(prefix_caching: bool) -> None:
    """Requests run to the end (some after a preemption) or are aborted while running, waiting or preempted:
    once all have left, the block manager holds no table, no block and no slot."""
    blocks = BlockManager(6, 4, num_slots=4, prefix_caching=prefix_caching)
    sched = Scheduler(blocks, max_num_seqs=4)
    reqs = [Request(f"r{i}", [100 * i + j for j in range(7)], SamplingParams(max_tokens=8), arrival_time=i)
            for i in range(6)]  # no prefix in common: check_blocks holds
    add_all(sched, reqs)
    while sched.num_preemptions < 2:
        fake_execute(sched, sched.schedule())
    running, preempted, waiting = ([r for r in reqs if r.status == st] for st in
                                   (RequestStatus.RUNNING, RequestStatus.PREEMPTED, RequestStatus.WAITING))
    assert running and preempted and waiting
    for req in preempted:  # it holds nothing; its table keeps only its block names, for when it comes back
        assert not blocks.holds(req) and blocks.table(req) == BlockTable(block_names=blocks.table(req).block_names)
    for req in (running[-1], preempted[-1], waiting[0]):
        sched.finish(req, RequestStatus.FINISHED_ABORTED)
    run_to_end(sched)
    assert [r.status for r in reqs].count(RequestStatus.FINISHED_ABORTED) == 3
    assert any(r.num_preemptions and r.status == RequestStatus.FINISHED_LENGTH for r in reqs)
    assert blocks.num_tables == 0, "a request that left still has a table"
    assert blocks.num_free == blocks.num_blocks and blocks.num_free_slots == blocks.num_slots
    assert blocks.num_shared == 0 and all(blocks.references(b) == 0 for b in range(blocks.num_blocks))


def test_random_load_never_shares_blocks_and_returns_them_all() -> None:
    """Arrivals, aborts, preemptions and chunked prompts at random; the invariants hold after every step."""
    rng = random.Random(0)
    sched = Scheduler(BlockManager(24, 4, num_slots=6), max_num_seqs=6, max_num_batched_tokens=12)
    arrived: list[Request] = []
    step = 0
    while step < 2000 and (step < 200 or sched.has_work()):
        if step < 200 and rng.random() < 0.4:
            src = rng.randint(1, 12) if rng.random() < 0.3 else None
            req = make_request(f"r{step}", rng.randint(1, 30), max_tokens=rng.randint(1, 40), arrival=step,
                               source_len=src)
            probe = make_request("probe", req.num_tokens + req.params.max_tokens, source_len=src)
            if sched.blocks_needed(probe) <= sched.blocks.num_blocks:
                sched.add(req)
                arrived.append(req)
        live = list(sched.running) + list(sched.waiting)
        if live and rng.random() < 0.05:
            sched.finish(rng.choice(live), RequestStatus.FINISHED_ABORTED)
        plan = sched.schedule()
        check_blocks(sched)
        assert len(sched.running) <= 6 and plan.num_tokens <= 12
        assert not (sched.has_work() and plan.is_empty), "work is queued but nothing was scheduled"
        fake_execute(sched, plan)
        check_blocks(sched)
        step += 1
    assert not sched.has_work(), "requests were left behind"
    assert sched.blocks.num_free == 24 and sched.blocks.num_free_slots == 6 and sched.blocks.num_tables == 0
    assert sched.num_preemptions > 0, "the load was meant to cause preemptions"
    for req in arrived:
        assert req.status.is_finished and not sched.blocks.holds(req)
        if req.status == RequestStatus.FINISHED_LENGTH:
            assert len(req.output_ids) == req.params.max_tokens


def test_scheduler_imports_no_torch_and_no_web_framework() -> None:
    code = "import sys, service.engine.scheduler; print(sorted({'torch', 'fastapi', 'starlette'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


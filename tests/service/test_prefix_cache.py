"""Prefix caching and block sharing in the scheduler and block manager, no model.

A fake runner writes every scheduled token into a simulated pool at the place the request's block table says
(block_ids[p // block_size], offset p % block_size), as the real runner writes K/V. Before every step each
running request's computed positions must still hold its own tokens: a shared block that was overwritten, a
cached block reused for other tokens, or a block evicted while in use shows up as a wrong token. After
everything ends, reference counts, the budget and the slots are back to their start, and the block manager
keeps no request's table."""

from __future__ import annotations

import random

from service.engine.blocks import BlockManager
from service.engine.request import ModelOutput, Request, RequestStatus, SamplingParams
from service.engine.scheduler import Scheduler, SchedulerOutput


class FakePool:
    def __init__(self) -> None:
        self.slots: dict[tuple[int, int], int] = {}
        self.copies = 0

    def check(self, sched: Scheduler) -> None:
        bs = sched.blocks.block_size
        for req in sched.running:
            ids, table = req.all_ids, sched.blocks.block_ids(req)
            for p in range(req.num_computed):
                assert self.slots.get((table[p // bs], p % bs)) == ids[p], (
                    f"{req.request_id}: position {p} of block {table[p // bs]} lost its token")
            assert all(sched.blocks.references(b) > 0 for b in table)


def step(sched: Scheduler, pool: FakePool, token: int | None = None, rng: random.Random | None = None) -> None:
    pool.check(sched)
    run(sched, pool, sched.schedule(), token, rng)


def run(sched: Scheduler, pool: FakePool, plan: SchedulerOutput, token: int | None = None,
        rng: random.Random | None = None) -> None:
    """What the runner does with a plan: copy, write each scheduled token where its block lies, sample, update."""
    bs = sched.blocks.block_size
    pool.copies += len(plan.copies)
    for source, dest, n in plan.copies:
        for p in range(n):
            pool.slots[(dest, p)] = pool.slots[(source, p)]
    for s in plan.scheduled:
        req = s.request
        ids = req.all_ids
        for p in range(s.start, s.start + s.num_new):
            block = s.table.block_ids[p // bs]
            if p // bs < s.table.own_start or sched.blocks.references(block) != 1:
                raise AssertionError(f"{req.request_id} writes position {p} into a block it shares")
            pool.slots[(block, p % bs)] = ids[p]
    tokens = [(token if token is not None else (rng or random).randrange(50, 60)) if s.samples else -1
              for s in plan.scheduled]
    sched.update(plan, ModelOutput(tokens))


def request(rid: str, prompt: list[int], max_tokens: int = 4) -> Request:
    return Request(rid, list(prompt), SamplingParams(max_tokens=max_tokens, ignore_eos=True))


def assert_clean(blocks: BlockManager) -> None:
    assert blocks.num_free == blocks.num_blocks and blocks.num_shared == 0
    assert all(blocks.references(b) == 0 for b in range(blocks.num_blocks))
    assert blocks.num_free_slots == blocks.num_slots and blocks.num_tables == 0


def test_a_later_request_reuses_the_computed_prefix_and_the_hit_counter_counts_it() -> None:
    blocks = BlockManager(64, 4, num_slots=4, prefix_caching=True)
    sched, pool = Scheduler(blocks), FakePool()
    a = request("a", list(range(1, 19)))  # 18 tokens: 4 full blocks
    sched.add(a)
    while sched.has_work():
        if blocks.block_ids(a):
            a_blocks = list(blocks.block_ids(a))
        step(sched, pool, 7)
    assert blocks.cache is not None and blocks.cache.hits == 0 and blocks.cache.queries == 18
    b = request("b", [*range(1, 15), 99, 98])  # shares the first 3 full blocks (12 tokens) and 2 more
    sched.add(b)
    plan = sched.schedule()
    assert [(s.start, s.num_new) for s in plan.scheduled] == [(14, 2)], "only the new tokens are computed"
    assert blocks.cache.hits == 14 and blocks.cache.queries == 18 + 16
    table = blocks.table(b)
    assert table.own_start == 3 and table.block_ids[:3] == a_blocks[:3], "the cached blocks are b's first three"
    run(sched, pool, plan, 7)
    while sched.has_work():
        step(sched, pool, 7)
    assert_clean(blocks)


def test_n_choices_hold_the_prompt_once() -> None:
    blocks = BlockManager(64, 4, num_slots=8, prefix_caching=True)
    sched, pool = Scheduler(blocks), FakePool()
    prompt = list(range(1, 11))  # 10 tokens: 2 full blocks + 2 tokens
    choices = [request(f"c{i}", prompt, max_tokens=3) for i in range(4)]
    for r in choices:
        sched.add(r)
    step(sched, pool, 5)  # the first choice computes the prompt; the others wait for its blocks
    assert [r.status for r in choices] == [RequestStatus.RUNNING] + [RequestStatus.WAITING] * 3
    step(sched, pool, 5)
    assert all(r.status == RequestStatus.RUNNING for r in choices)
    held = {b for r in choices for b in blocks.block_ids(r)}
    assert sum(len(blocks.block_ids(r)) for r in choices) == 4 * 3
    assert len(held) == 2 + 4, "the prompt's 2 full blocks once, a last block per choice"
    assert blocks.num_shared == 2 and blocks.num_free == 64 - 6
    while sched.has_work():
        step(sched, pool, 5)
    assert_clean(blocks)


def test_eviction_under_pressure_never_touches_a_block_in_use_and_everything_returns() -> None:
    """Random prompts over a few shared prefixes, a small pool: preemption, eviction and aborts happen."""
    rng = random.Random(0)
    blocks = BlockManager(24, 4, num_slots=6, prefix_caching=True)
    sched, pool = Scheduler(blocks, max_num_seqs=5, max_num_batched_tokens=24), FakePool()
    prefixes = [[rng.randrange(1, 40) for _ in range(rng.choice((4, 9, 16)))] for _ in range(3)]
    live: list[Request] = []
    for i in range(120):
        if rng.random() < 0.5:
            prompt = rng.choice(prefixes) + [rng.randrange(1, 40) for _ in range(rng.randrange(1, 8))]
            r = request(f"r{i}", prompt[:28], max_tokens=rng.randrange(1, 21))
            sched.add(r)
            live.append(r)
        if live and rng.random() < 0.08:  # an abort at any moment
            victim = rng.choice(live)
            if not victim.status.is_finished:
                sched.finish(victim, RequestStatus.FINISHED_ABORTED)
        step(sched, pool, rng=rng)
        live = [r for r in live if not r.status.is_finished]
    while sched.has_work():
        step(sched, pool, rng=rng)
    assert sched.num_preemptions > 0, "the pool was never under pressure"
    assert blocks.cache is not None and blocks.cache.hits > 0
    assert pool.copies > 0, "no request started inside a block computed by another"
    assert_clean(blocks)


def test_without_prefix_caching_nothing_is_shared() -> None:
    blocks = BlockManager(64, 4, num_slots=4)
    sched, pool = Scheduler(blocks), FakePool()
    for i in range(3):
        sched.add(request(f"r{i}", list(range(1, 14))))
    step(sched, pool, 3)
    assert all(blocks.table(r).own_start == 0 and r.num_computed == 13 for r in sched.running)
    assert blocks.num_shared == 0
    while sched.has_work():
        step(sched, pool, 3)
    assert_clean(blocks)

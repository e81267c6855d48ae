"""The scheduler's prefill budget while streams decode: each prompt's chunk is capped at the step's decode rows
(so one long prompt does not stall the streams), and several arriving prompts each take their chunk within the
step's token budget (so a burst starts together)."""

from __future__ import annotations

from service.engine.blocks import BlockManager
from service.engine.request import Request, SamplingParams
from service.engine.scheduler import Scheduler
from tests.service.test_scheduler import add_all, fake_execute, make_request


def test_while_streams_decode_a_long_prompt_advances_by_the_decode_rows_a_step() -> None:
    sched = Scheduler(BlockManager(400, 4), max_num_seqs=16, max_num_batched_tokens=512, min_prefill_chunk=4)
    add_all(sched, [make_request(f"d{i}", 3, max_tokens=50, arrival=i) for i in range(10)])
    first = sched.schedule()
    assert first.num_tokens == 30  # nothing decodes yet: the whole budget is there for prompts
    fake_execute(sched, first)
    long = make_request("long", 100, arrival=20)
    sched.add(long)
    sizes = []
    while not long.output_ids:
        plan = sched.schedule()
        assert sum(s.is_decode for s in plan.scheduled) == 10
        sizes += [s.num_new for s in plan.scheduled if s.request is long]
        fake_execute(sched, plan)
    assert sizes == [10] * 10  # as many prompt tokens per step as there are decode rows


def test_while_streams_decode_a_burst_of_short_prompts_starts_in_one_step() -> None:
    sched = Scheduler(BlockManager(400, 4), max_num_seqs=32, max_num_batched_tokens=512, min_prefill_chunk=4)
    add_all(sched, [make_request(f"d{i}", 3, max_tokens=50, arrival=i) for i in range(4)])
    fake_execute(sched, sched.schedule())
    burst = [Request(f"b{i}", [100 * i + t for t in range(1, 7)], SamplingParams(max_tokens=8), arrival_time=10 + i)
             for i in range(12)]  # distinct prompts: none waits for another's blocks
    longer = Request("longer", list(range(2000, 2040)), SamplingParams(max_tokens=8), arrival_time=30)
    add_all(sched, [*burst, longer])
    plan = sched.schedule()
    new = {s.request.request_id: s.num_new for s in plan.scheduled if not s.is_decode}
    # each prompt advances by at most max(decode rows, min_prefill_chunk) = 4 tokens; all of them start now
    assert sum(s.is_decode for s in plan.scheduled) == 4
    assert new == {**{r.request_id: 4 for r in burst}, "longer": 4}
    fake_execute(sched, plan)
    assert {s.request.request_id: s.num_new for s in sched.schedule().scheduled if not s.is_decode} == {
        **{r.request_id: 2 for r in burst}, "longer": 4}

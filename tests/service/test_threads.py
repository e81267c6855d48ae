"""The CPU step's thread count (service/engine/threads.py): where the rule would split a decode step over the
cores, the step times decide between all threads and one; probes of the other count come at FIRST_PROBE and every
PERIOD steps of a size, their first step (which pays the switch) is not counted, and a change of conditions is
followed back. Step times are fed as the runner would record them."""

from __future__ import annotations

from service.engine.threads import FIRST_PROBE, PERIOD, PROBE, ThreadChoice, Threads

BIG = dict(max_threads=2, weight_bytes=268e6, flops_per_token=2.7e8, flops_per_s=100e9)  # SmolLM2 in bfloat16


def run(choice: ThreadChoice, steps: int, seconds: dict[int, float], first_probe_step: float | None = None) -> list[int]:
    """`steps` steps timed `seconds[threads]` each; the counts used, in order."""
    used = []
    for _ in range(steps):
        n = choice.next()
        probe_start = choice.probing == PROBE and n != choice.kept
        used.append(n)
        choice.record(first_probe_step if probe_start and first_probe_step is not None else seconds[n])
    return used


def test_keeps_all_threads_while_they_are_faster_and_probes_one_rarely() -> None:
    choice = ThreadChoice(2)
    used = run(choice, 2 * PERIOD + PROBE - 1, {2: 0.010, 1: 0.014})
    assert choice.kept == 2 and choice.switches == 0
    assert used.count(1) == 3 * PROBE  # at FIRST_PROBE, PERIOD and 2 * PERIOD
    assert used[FIRST_PROBE - 1 : FIRST_PROBE - 1 + PROBE] == [1] * PROBE and used[: FIRST_PROBE - 1] == [2] * (FIRST_PROBE - 1)


def test_switches_to_one_thread_where_it_measures_faster_and_back_when_conditions_change() -> None:
    choice = ThreadChoice(2)
    run(choice, FIRST_PROBE + PROBE, {2: 0.016, 1: 0.012})
    assert choice.kept == 1 and choice.switches == 1
    used = run(choice, PERIOD - FIRST_PROBE - PROBE - 1, {2: 0.016, 1: 0.012})
    assert set(used) == {1}  # no probe before the period
    run(choice, PERIOD, {2: 0.009, 1: 0.013})  # the second core pays again: the next probe brings it back
    assert choice.kept == 2 and choice.switches == 2


def test_a_probes_first_step_does_not_count_and_a_small_gain_does_not_switch() -> None:
    choice = ThreadChoice(2)
    run(choice, FIRST_PROBE + PROBE, {2: 0.016, 1: 0.012}, first_probe_step=1.0)  # the switch's cost, ignored
    assert choice.kept == 1
    steady = ThreadChoice(2)
    run(steady, FIRST_PROBE + PROBE, {2: 0.0100, 1: 0.0098})  # 2% faster: within the noise, kept
    assert steady.kept == 2


def test_only_decode_steps_the_rule_splits_are_measured() -> None:
    threads = Threads(**BIG)
    assert threads.choose(1, 1, decode_only=False) == 2 and not threads.choices  # a prefill step: the rule
    tiny = Threads(2, 2e6, 2e6, 100e9)  # a 1M-parameter model: one thread by the rule, never measured
    assert tiny.choose(1, 1, decode_only=True) == 1 and not tiny.choices
    for _ in range(FIRST_PROBE + PROBE):
        n = threads.choose(1, 1, decode_only=True)
        threads.record(0.012 if n == 1 else 0.016)
    assert threads.choices[1].kept == 1 and threads.choose(1, 1, decode_only=True) == 1
    assert threads.choose(3, 3, decode_only=True) == 2 and set(threads.choices) == {1, 4}  # sizes apart

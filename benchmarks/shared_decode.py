"""Does sharing a prefix cost anything at decode? One decode step of the engine's runner, no HTTP, two ways.

    python -m benchmarks.shared_decode                       # SmolLM2-135M, 32 rows x 232 keys, float32 + bfloat16

`--rows` sequences each decode one token over `--keys` keys. Either every sequence's block table names blocks of
its own, or its first `--shared` keys' blocks are the same blocks for all of them (a common system prompt under
prefix caching: the table names them, attention reads them in place). Reported: the median step time of each
(`--repeats` steps after a warm-up) and shared / own. Same weights, same threads, one process."""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from benchmarks.checkpoints import make_model
from model.checkpoint import DTYPES, load_checkpoint
from service.engine.blocks import BlockTable
from service.engine.request import Request, SamplingParams
from service.engine.runner import ModelRunner
from service.engine.scheduler import ScheduledRequest


def step_ms(runner: ModelRunner, rows: int, keys: int, shared_blocks: int, repeats: int) -> float:
    bs = runner.block_size
    per = -(-keys // bs)
    plan = []
    for i in range(rows):
        prompt = [(10 + j) % runner.config.vocab_size for j in range(keys)]
        req = Request(f"r{i}", prompt, SamplingParams(max_tokens=1, temperature=0.0))
        own = list(range(i * per, (i + 1) * per))
        table = BlockTable(list(range(shared_blocks)) + own[shared_blocks:], slot=i)
        plan.append(ScheduledRequest(req, keys - 1, 1, table))
    for _ in range(3):
        runner.execute(plan)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        runner.execute(plan)
        times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.shared_decode", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--rows", type=int, default=32)
    p.add_argument("--keys", type=int, default=232)
    p.add_argument("--shared", type=int, default=192, help="leading keys in shared blocks (a block multiple)")
    p.add_argument("--repeats", type=int, default=10)
    a = p.parse_args(argv)
    ckpt = load_checkpoint(make_model(a.model, Path.home() / ".cache" / "attnserve-bench"))
    print(f"| {a.model} | {a.rows} rows x {a.keys} keys | own blocks ms | first {a.shared} keys shared ms | shared / own |")
    print("|---|---|---|---|---|")
    for dtype in a.dtypes.split(","):
        per = -(-a.keys // 16)
        runner = ModelRunner(ckpt.model, a.rows * per + 8, a.rows, a.keys + 16, 16, "cpu", DTYPES[dtype])
        own = step_ms(runner, a.rows, a.keys, 0, a.repeats)
        shared = step_ms(runner, a.rows, a.keys, a.shared // 16, a.repeats)
        print(f"| {dtype} | decode step | {own:.1f} | {shared:.1f} | {shared / own:.2f}x |")
        del runner  # the next dtype's runner recasts the same model (its prepacked linears are packed anew)


if __name__ == "__main__":
    main()

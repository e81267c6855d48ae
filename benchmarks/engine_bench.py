"""Offline engine throughput: the continuous-batching engine driven directly, no HTTP, random weights.

    python -m benchmarks.engine_bench --batch-sizes 1,8,32 --input-len 32 --output-len 128 --dtype float32,bfloat16
    python -m benchmarks.engine_bench --preset tiny-gpt --batch-sizes 2 --output-len 8 --json out.json

For each (dtype, batch size B): a fresh engine over the preset's model (default `gpt-char`: 6 layers, d_model 384,
6 heads, ~10.7M parameters) with a KV pool that holds all B requests; a few warm-up steps; then B requests of
`--input-len` random tokens each, greedy, `--output-len` tokens each (EOS ignored), submitted at once. Reported:
generated tokens per second over the wall time from submission to the last token, and the engine's own step
times (the prefill step, and the mean / median of decode-only steps, from its per-step stats)."""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import statistics
import string
import sys
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from model.checkpoint import DTYPES
from model.config import preset
from model.tokenizer import Tokenizer
from model.transformer import DecoderOnlyLM, build_model, num_parameters
from service.engine.engine import Engine, EngineConfig, StepStats
from service.engine.request import Request, SamplingParams
from service.engine.runner import ModelRunner

BLOCK_SIZE = 16


def char_tokenizer(vocab_size: int) -> Tokenizer:
    """A character tokenizer with exactly `vocab_size` ids (4 specials + printable characters)."""
    chars = (string.ascii_letters + string.digits + string.punctuation + " \n")[: vocab_size - 4]
    tok = Tokenizer.train_char(chars)
    assert tok.vocab_size == vocab_size, (tok.vocab_size, vocab_size)
    return tok


def build(preset_name: str, seed: int = 0) -> tuple[DecoderOnlyLM, Tokenizer]:
    torch.manual_seed(seed)
    model = build_model(preset(preset_name, dropout=0.0, attn_dropout=0.0))
    if not isinstance(model, DecoderOnlyLM):
        raise SystemExit(f"{preset_name} is not a decoder-only preset")
    return model.eval(), char_tokenizer(model.config.vocab_size)


def run_one(model: DecoderOnlyLM, tok: Tokenizer, dtype: str, batch: int, input_len: int, output_len: int,
            device: str = "cpu", seed: int = 0, progress: bool = True) -> dict[str, Any]:
    """One engine, `batch` requests submitted together; returns throughput and step-time figures."""
    cfg = model.config
    if input_len + output_len > cfg.max_len:
        raise SystemExit(f"input + output = {input_len + output_len} exceeds the model's max_len {cfg.max_len}")
    per_request = -(-(input_len + output_len + 1) // BLOCK_SIZE)
    budget = max(2048, batch * input_len)
    num_blocks = batch * per_request + 4
    runner = ModelRunner(copy.deepcopy(model), num_blocks, batch, cfg.max_len, BLOCK_SIZE, device, DTYPES[dtype],
                         budget)
    config = EngineConfig(num_blocks=num_blocks, block_size=BLOCK_SIZE, max_num_seqs=batch,
                          max_num_batched_tokens=budget,
                          max_model_len=cfg.max_len, queue_timeout=None)
    steps: list[StepStats] = []
    engine = Engine("bench", runner, config, tok.decode, None, on_step=steps.append)
    gen = torch.Generator().manual_seed(seed)
    prompts = torch.randint(4, cfg.vocab_size, (batch, input_len), generator=gen).tolist()
    engine.warmup(prompts[0][:8], steps=4)
    steps.clear()
    params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    bar = tqdm(total=batch * output_len, desc=f"{dtype} B={batch}", unit="tok", leave=False, disable=not progress)

    async def one(i: int) -> int:
        n = 0
        async with engine.open(Request(f"bench-{i}", prompts[i], params)) as stream:
            async for out in stream:
                if out.token_id is not None:
                    n += 1
                    bar.update(1)
        return n

    async def run_all() -> list[int]:
        return await asyncio.gather(*(one(i) for i in range(batch)))

    engine.start()
    try:
        start = time.perf_counter()
        counts = asyncio.run(run_all())
        wall = time.perf_counter() - start
    finally:
        engine.stop()
        bar.close()
    decode = [s.step_time for s in steps if s.num_prefill_tokens == 0 and s.batch_size == batch]
    prefill = [s.step_time for s in steps if s.num_prefill_tokens > 0]
    tokens = sum(counts)
    assert tokens == batch * output_len, f"expected {batch * output_len} tokens, got {tokens}"
    return {
        "dtype": dtype,
        "batch": batch,
        "input_len": input_len,
        "output_len": output_len,
        "tokens": tokens,
        "wall_s": round(wall, 4),
        "tokens_per_s": round(tokens / wall, 1),
        "steps": len(steps),
        "full_batch_decode_steps": len(decode),
        "decode_step_ms_mean": round(1000 * statistics.fmean(decode), 3) if decode else None,
        "decode_step_ms_median": round(1000 * statistics.median(decode), 3) if decode else None,
        "prefill_step_ms": round(1000 * sum(prefill), 3),
        "preemptions": engine.scheduler.num_preemptions,
    }


def table(rows: list[dict[str, Any]]) -> str:
    head = f"{'dtype':<9} {'batch':>5} {'tok/s':>9} {'decode ms/step':>15} {'(median)':>9} {'prefill ms':>11} {'wall s':>8}"
    lines = [head, "-" * len(head)]
    def ms(v: float | None, width: int) -> str:
        return f"{v:>{width}.2f}" if v is not None else f"{'-':>{width}}"  # no full-batch decode step

    for r in rows:
        lines.append(f"{r['dtype']:<9} {r['batch']:>5} {r['tokens_per_s']:>9.1f} {ms(r['decode_step_ms_mean'], 15)} "
                     f"{ms(r['decode_step_ms_median'], 9)} {r['prefill_step_ms']:>11.2f} {r['wall_s']:>8.2f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="gpt-char", help="a decoder-only preset of model.config (random weights)")
    p.add_argument("--batch-sizes", default="1,8,32", help="comma-separated concurrent request counts")
    p.add_argument("--input-len", type=int, default=32, help="prompt tokens per request")
    p.add_argument("--output-len", type=int, default=128, help="generated tokens per request")
    p.add_argument("--dtype", default="float32,bfloat16", help="comma-separated: float32, bfloat16, float16")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    model, tok = build(a.preset)
    batches = [int(b) for b in a.batch_sizes.split(",")]
    dtypes = a.dtype.split(",")
    unknown = [d for d in dtypes if d not in DTYPES]
    if unknown:
        raise SystemExit(f"unknown dtype {unknown[0]!r}; choose from {sorted(DTYPES)}")
    grid = [(d, b) for d in dtypes for b in batches]
    rows = [run_one(model, tok, d, b, a.input_len, a.output_len, a.device, progress=not a.no_progress)
            for d, b in tqdm(grid, desc="configurations", disable=a.no_progress)]
    result = {
        "benchmark": "engine_offline",
        "preset": a.preset,
        "parameters": num_parameters(model),
        "device": a.device,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "results": rows,
    }
    sys.stdout.write(f"{a.preset}: {result['parameters'] / 1e6:.1f}M parameters, {a.device}, "
                     f"{result['threads']} threads, input {a.input_len}, output {a.output_len}\n")
    sys.stdout.write(table(rows) + "\n")
    sys.stdout.write(json.dumps(result, indent=2) + "\n")
    if a.json is not None:
        a.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

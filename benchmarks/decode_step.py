"""Per-token decode time with the ContiguousKVCache for a random-weight decoder-only model.

    python -m benchmarks.decode_step                      # gpt-char sizes, batch 1 and 32, float32 and bfloat16
    python -m benchmarks.decode_step --batch 1,8 --dtype float32 --steps 64 --json out.json

The model is the `gpt-char` preset (6 layers, d_model 384, 6 heads, d_ff 1536, vocab 65) with random weights.
For each (dtype, batch): a prompt of `--prompt` random tokens is prefilled into the cache (not timed), then
`--steps` greedy decode steps of one token per sequence are timed one by one; the reported step time is the
median over the run (the context grows from prompt to prompt + steps tokens during it)."""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from model.checkpoint import DTYPES
from model.config import preset
from model.kv_cache import ContiguousKVCache
from model.transformer import DecoderOnlyLM


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def measure(
    model: DecoderOnlyLM, batch: int, prompt_len: int, steps: int, device: torch.device, seed: int = 0
) -> dict[str, Any]:
    """Time `steps` single-token decode steps for `batch` sequences after a prefill of `prompt_len` tokens."""
    cfg = model.config
    dtype = next(model.parameters()).dtype
    gen = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, cfg.vocab_size, (batch, prompt_len), generator=gen).to(device)
    cache = ContiguousKVCache(cfg, batch, max_len=prompt_len + steps, device=device, dtype=dtype)
    positions = torch.arange(prompt_len, device=device).expand(batch, prompt_len)
    logits = model(prompt, positions, cache=cache)
    token = logits[:, -1].argmax(-1, keepdim=True)  # (B, 1)
    _sync(device)
    times: list[float] = []
    for pos in range(prompt_len, prompt_len + steps):
        start = time.perf_counter()
        logits = model(token, torch.full((batch, 1), pos, device=device), cache=cache)
        token = logits[:, -1].argmax(-1, keepdim=True)
        _sync(device)
        times.append(time.perf_counter() - start)
    median = statistics.median(times)
    return {
        "dtype": str(dtype).removeprefix("torch."),
        "batch": batch,
        "prompt": prompt_len,
        "steps": steps,
        "median_step_ms": median * 1e3,
        "p90_step_ms": statistics.quantiles(times, n=10)[-1] * 1e3 if len(times) > 1 else median * 1e3,
        "tokens_per_s": batch / median,
    }


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=_ints, default=[1, 32], help="comma-separated batch sizes (default 1,32)")
    parser.add_argument("--dtype", default="float32,bfloat16", help="comma-separated: float32, bfloat16, float16")
    parser.add_argument("--prompt", type=int, default=32, help="prompt tokens prefilled before timing")
    parser.add_argument("--steps", type=int, default=128, help="timed decode steps")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--preset", default="gpt-char", help="the model shape (a model.config preset)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results to this file")
    args = parser.parse_args(argv)

    dtypes = [d for d in args.dtype.split(",") if d]
    unknown = [d for d in dtypes if d not in DTYPES]
    if unknown:
        parser.error(f"unknown dtype(s) {unknown}; known: {sorted(DTYPES)}")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    cfg = preset(args.preset, dropout=0.0, attn_dropout=0.0)
    if args.prompt + args.steps > cfg.max_len:
        parser.error(f"prompt + steps = {args.prompt + args.steps} exceeds max_len {cfg.max_len}")
    device = torch.device(args.device)

    torch.manual_seed(args.seed)
    base = DecoderOnlyLM(cfg).eval()
    results = []
    for dtype in dtypes:
        model = DecoderOnlyLM(cfg).eval()
        model.load_state_dict(base.state_dict())
        model.to(device=device, dtype=DTYPES[dtype])
        for batch in args.batch:
            measure(model, batch, args.prompt, min(args.steps, 8), device, args.seed)  # warm-up
            results.append(measure(model, batch, args.prompt, args.steps, device, args.seed))

    report = {
        "benchmark": "decode_step",
        "model": {"preset": args.preset, "n_layers": cfg.n_decoder_layers, "d_model": cfg.d_model, "h": cfg.h,
                  "d_ff": cfg.d_ff, "vocab_size": cfg.vocab_size},
        "device": str(device),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "results": results,
    }
    print(f"decode step, {args.preset} random weights, {device}, {torch.get_num_threads()} threads, "
          f"prompt {args.prompt}, {args.steps} steps (median)")
    print(f"{'dtype':<10} {'batch':>5} {'median ms':>10} {'p90 ms':>8} {'tokens/s':>10}")
    for r in results:
        print(f"{r['dtype']:<10} {r['batch']:>5} {r['median_step_ms']:>10.2f} {r['p90_step_ms']:>8.2f} "
              f"{r['tokens_per_s']:>10.1f}")
    text = json.dumps(report, indent=2)
    print(text)
    if args.json is not None:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

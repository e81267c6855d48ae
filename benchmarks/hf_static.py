"""The best naive batching can do: Hugging Face `generate()` on one padded batch, offline, no HTTP.

    python -m benchmarks.hf_static --model HF_FOLDER --dtype bfloat16 --batch 32 --input-len 32 --output-len 128

The prompts are seeded random token ids, left-padded into one batch with an attention mask (the layout
batched `generate()` needs; with equal lengths the padding is empty). min_new_tokens = max_new_tokens =
output-len, greedy, so every row produces exactly output-len tokens; the whole batch starts together and
ends together, which is the static batching a server without iteration-level scheduling would do at best.
Reports the output tokens/s of one timed run after a short warm-up."""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pad_left(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) ids and (B, T) attention mask, each row right-aligned (generate() appends on the right)."""
    width = max(len(s) for s in seqs)
    ids = torch.tensor([[pad_id] * (width - len(s)) + s for s in seqs])
    mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs])
    return ids, mask


def eos_id(cfg: Any) -> int:
    """The config's end-of-text id (the first, where it lists several), 0 when it has none."""
    eos = cfg.eos_token_id
    return int((eos[0] if isinstance(eos, list | tuple) and eos else eos) or 0)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_static(folder: Path, dtype: str = "float32", batch: int = 32, input_len: int = 32, output_len: int = 128,
               seed: int = 0, device: str = "cpu") -> dict[str, Any]:
    """Time one greedy generate() of `batch` prompts; output tokens/s over the wall time of that call."""
    dev = torch.device(device)
    model: Any = AutoModelForCausalLM.from_pretrained(folder, dtype=DTYPES[dtype])  # a GPT-2 or Llama folder
    model = model.to(dev).eval()
    cfg = model.config
    pad = eos_id(cfg)
    rng = random.Random(seed)
    ids, mask = pad_left([[rng.randrange(cfg.vocab_size) for _ in range(input_len)] for _ in range(batch)], pad)
    ids, mask = ids.to(dev), mask.to(dev)

    def generate(n: int) -> torch.Tensor:
        with torch.inference_mode():
            out: torch.Tensor = model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                                               do_sample=False, pad_token_id=pad, eos_token_id=pad)
        return out

    generate(2)  # warm-up: allocator, kernels, generation config
    _sync(dev)
    start = time.perf_counter()
    out = generate(output_len)
    _sync(dev)
    seconds = time.perf_counter() - start
    produced = int((out.shape[1] - ids.shape[1]) * batch)
    return {"model": folder.name, "dtype": dtype, "device": device, "batch": batch, "input_len": input_len,
            "output_len": output_len, "seconds": seconds, "output_tokens": produced,
            "output_throughput": produced / seconds, "step_ms": 1000 * seconds / output_len,
            "threads": torch.get_num_threads()}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.hf_static", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, required=True, help="a Hugging Face GPT-2 or Llama folder")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--input-len", type=int, default=32)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int)
    p.add_argument("--json", type=Path, help="also write the result here")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    result = run_static(a.model, a.dtype, a.batch, a.input_len, a.output_len, a.seed, a.device)
    text = json.dumps(result, indent=2)
    sys.stdout.write(text + "\n")
    if a.json is not None:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(text + "\n")


if __name__ == "__main__":
    main()

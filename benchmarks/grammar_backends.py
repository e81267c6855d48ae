"""xgrammar against llguidance on our tokenizers: why structured output uses xgrammar (service/engine/structured.py).

    python -m benchmarks.grammar_backends [--gguf PATH] [--steps 64]

For each tokenizer (SmolLM2-135M's, read from its GGUF file as the server reads it, and the shipped character-level
shakespeare-gpt's) and each library: whether it reads the tokenizer at all, the time to read it, then per
constraint (JSON schemas of growing size, a regex) the cold compile time (llguidance compiles lazily: its matcher's
construction plus first mask), and the median time of one token's mask over a walk of `--steps` tokens chosen
from random logits under the mask (the engine's per-row cost in a step). llguidance is optional (a dev extra)."""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from model.tokenizer import Tokenizer

SCHEMAS: dict[str, dict[str, Any]] = {
    "flat": {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                             "age": {"type": "integer", "minimum": 0, "maximum": 120}},
             "required": ["name", "age"]},
    "nested": {"type": "object", "properties": {
        "id": {"type": "string", "pattern": "^[A-Z]{2}[0-9]{4}$"},
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 4},
        "owner": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 10},
                                                   "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                  "required": ["city", "zip"]}}, "required": ["id", "tags", "owner"]},
}
REGEX = r"[A-Z][a-z]{2,8}( [a-z]{2,8}){1,4}\."


def _walk(fill: Callable[[], torch.Tensor], accept: Callable[[int], bool], done: Callable[[], bool],
          apply: Callable[[torch.Tensor, torch.Tensor], None], vocab: int, steps: int) -> list[float]:
    """Seconds per mask over a walk of random tokens the mask allows."""
    gen = torch.Generator().manual_seed(0)
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        mask = fill()
        times.append(time.perf_counter() - t)
        logits = torch.randn(1, vocab, generator=gen)
        apply(logits, mask)
        if not accept(int(logits.argmax())) or done():
            break
    return times


def xgrammar_rows(tok: Tokenizer, vocab: int, steps: int) -> list[dict[str, Any]]:
    import xgrammar as xgr

    from service.engine.structured import tokenizer_info

    t = time.perf_counter()
    compiler = xgr.GrammarCompiler(tokenizer_info(tok, vocab), max_threads=1, cache_enabled=False)
    rows = [{"library": "xgrammar", "constraint": "(tokenizer)", "seconds": time.perf_counter() - t}]
    specs = [(k, lambda s=s: compiler.compile_json_schema(json.dumps(s), any_whitespace=False))
             for k, s in SCHEMAS.items()] + [("regex", lambda: compiler.compile_regex(REGEX))]
    for name, compile_ in specs:
        t = time.perf_counter()
        matcher = xgr.GrammarMatcher(compile_())
        compile_s = time.perf_counter() - t
        mask = xgr.allocate_token_bitmask(1, vocab)

        def fill(m: Any = matcher, b: torch.Tensor = mask) -> torch.Tensor:
            m.fill_next_token_bitmask(b)
            return b

        times = _walk(fill, matcher.accept_token, matcher.is_terminated,
                      lambda x, b: xgr.apply_token_bitmask_inplace(x, b), vocab, steps)
        rows.append({"library": "xgrammar", "constraint": name, "seconds": compile_s,
                     "mask_median_us": statistics.median(times) * 1e6, "tokens": len(times)})
    return rows


def llguidance_rows(tok: Tokenizer, vocab: int, steps: int) -> list[dict[str, Any]]:
    try:
        import llguidance
        import llguidance.hf
        import llguidance.torch as lgt
        from transformers import PreTrainedTokenizerFast
    except ImportError:
        return [{"library": "llguidance", "constraint": "(tokenizer)", "error": "not installed"}]
    t = time.perf_counter()
    try:
        fast = PreTrainedTokenizerFast(tokenizer_object=tok.tok, eos_token=tok.specials.eos)
        lt = llguidance.hf.from_tokenizer(fast, n_vocab=vocab)
    except Exception as e:  # the finding is that it cannot read this tokenizer
        return [{"library": "llguidance", "constraint": "(tokenizer)", "error": str(e)[:120]}]
    rows: list[dict[str, Any]] = [{"library": "llguidance", "constraint": "(tokenizer)",
                                   "seconds": time.perf_counter() - t}]
    grammars = [(k, llguidance.LLMatcher.grammar_from_json_schema(json.dumps(s), defaults={
        "whitespace_flexible": False})) for k, s in SCHEMAS.items()]
    for name, grammar in [*grammars, ("regex", llguidance.LLMatcher.grammar_from_regex(REGEX))]:
        mask = lgt.allocate_token_bitmask(1, vocab)
        t = time.perf_counter()
        matcher = llguidance.LLMatcher(lt, grammar)
        lgt.fill_next_token_bitmask(matcher, mask, 0)  # its compilation is lazy: the first mask pays for it
        compile_s = time.perf_counter() - t

        def fill(m: Any = matcher, b: torch.Tensor = mask) -> torch.Tensor:
            lgt.fill_next_token_bitmask(m, b, 0)
            return b

        times = _walk(fill, matcher.consume_token, matcher.is_stopped, lgt.apply_token_bitmask_inplace, vocab, steps)
        rows.append({"library": "llguidance", "constraint": name, "seconds": compile_s,
                     "mask_median_us": statistics.median(times) * 1e6, "tokens": len(times)})
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gguf", type=Path, default=None, help="SmolLM2's GGUF (default: python -m model.fetch)")
    parser.add_argument("--steps", type=int, default=64)
    args = parser.parse_args(argv)
    import gguf

    from model.checkpoint import load_checkpoint
    from model.fetch import fetch
    from model.gguf_tokenizer import tokenizer_from_gguf

    smollm = tokenizer_from_gguf(gguf.GGUFReader(args.gguf or fetch("smollm2"))).tokenizer
    shakespeare = load_checkpoint(Path(__file__).resolve().parents[1] / "model/checkpoints/shakespeare-gpt")
    print("| tokenizer | library | constraint | compile (ms) | mask per token, median (us) |\n|---|---|---|---|---|")
    for label, tok, vocab in (("SmolLM2 (49,152)", smollm, 49152),
                              ("shakespeare-gpt (chars)", shakespeare.tokenizer, shakespeare.config.vocab_size)):
        for row in xgrammar_rows(tok, vocab, args.steps) + llguidance_rows(tok, vocab, args.steps):
            if "error" in row:
                print(f"| {label} | {row['library']} | - | cannot read it: {row['error']} | - |")
                continue
            mask = f"{row['mask_median_us']:.0f} ({row['tokens']} tokens)" if "mask_median_us" in row else "-"
            print(f"| {label} | {row['library']} | {row['constraint']} | {row['seconds'] * 1e3:.1f} | {mask} |")


if __name__ == "__main__":
    main()

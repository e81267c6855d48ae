"""Evaluate a checkpoint and print JSON.

    python -m model.evaluate CHECKPOINT --data input.txt [--split val|full]         # LM: loss, perplexity
    python -m model.evaluate CHECKPOINT --data multi30k/ [--split val|test] [--limit N] [--beam 4]
        [--length-penalty 0.6]                                                     # translator: sacreBLEU

Language models: per-character loss (nats) and perplexity over consecutive non-overlapping windows of the
model's context length on the validation split (nanoGPT's last 10%), or on the whole file with --split full.
Translators: detokenized, cased sacreBLEU of greedy decoding (batched here, token-for-token the same as
model.generate's greedy) and of beam search (model.generate.generate with num_beams and the GNMT length
penalty), plus the validation loss of the reference translations."""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from model.checkpoint import load_checkpoint
from model.data import TranslationData, encode_chars, eval_windows, read_parallel
from model.generate import GenerationConfig, generate
from model.kv_cache import ContiguousKVCache
from model.tokenizer import Tokenizer
from model.train import label_smoothed_loss
from model.transformer import DecoderOnlyLM, Transformer

# --- language models ----------------------------------------------------------------------------------------


@torch.no_grad()
def lm_loss(model: DecoderOnlyLM, ids: torch.Tensor, block: int | None = None, batch_size: int = 16,
            limit: int | None = None) -> tuple[float, int]:
    """Mean next-token NLL over consecutive windows of `block` tokens (the model's max_len by default)."""
    block = block or model.config.max_len
    total, count = 0.0, 0
    for x, y in eval_windows(ids, block, batch_size, limit):
        _, nll, n = label_smoothed_loss(model(x), y)
        total += float(nll) * n
        count += n
    return total / max(count, 1), count


def lm_text(tokenizer: Tokenizer, path: str | Path, split: str) -> str:
    text = Path(path).read_text(encoding="utf-8")
    if split == "full":
        return text
    if split != "val":
        raise SystemExit(f"--split {split}: a language model has the splits 'val' (last 10%) and 'full'")
    return text[int(len(text) * 0.9) :]


# --- translation --------------------------------------------------------------------------------------------


@torch.no_grad()
def greedy_batch(model: Transformer, sources: list[list[int]], bos_id: int, eos_id: int, max_new_tokens: int) -> list[list[int]]:
    """Greedy decoding of sources that all have the same length (so no padding enters any computation):
    the same operations as model.generate's greedy with the KV cache, for several sentences at once."""
    assert len({len(s) for s in sources}) == 1, "greedy_batch needs sources of one length"
    b = len(sources)
    memory = model.encode(torch.tensor(sources))
    cache = ContiguousKVCache(model.config, b)
    seqs = torch.full((b, 1), bos_id, dtype=torch.long)
    out: list[list[int]] = [[] for _ in range(b)]
    done = [False] * b
    fed = 0
    for _ in range(max_new_tokens):
        if seqs.size(1) >= model.config.max_len:
            break
        new = seqs[:, fed:]
        positions = torch.arange(fed, seqs.size(1)).expand_as(new)
        hidden = model.decode(new, positions, memory=memory, cache=cache)
        fed = seqs.size(1)
        tokens = model.logits(hidden[:, -1]).float().argmax(-1)
        for i, t in enumerate(tokens.tolist()):
            if not done[i]:
                if t == eos_id:
                    done[i] = True
                else:
                    out[i].append(t)
        if all(done):
            break
        seqs = torch.cat([seqs, tokens[:, None]], dim=1)
    return out


def translate(
    model: Transformer,
    tokenizer: Tokenizer,
    sources: list[str],
    beam: int = 1,
    length_penalty: float = 0.6,
    max_new_tokens: int | None = None,
    batch_size: int = 64,
    progress: bool = False,
) -> list[str]:
    """Detokenized translations: greedy (beam 1, batched by source length) or beam search (one at a time)."""
    bos, eos = tokenizer.bos_id, tokenizer.eos_id
    assert bos is not None and eos is not None
    cap = model.config.max_len
    ids = [tokenizer.encode(s)[:cap] for s in sources]

    def budget(n: int) -> int:
        return max_new_tokens or min(cap, 2 * n + 10)

    outputs: list[list[int]] = [[] for _ in sources]
    bar = tqdm(total=len(sources), disable=not progress, file=sys.stderr, desc=f"beam {beam}")
    if beam <= 1:
        groups: dict[int, list[int]] = defaultdict(list)
        for i, s in enumerate(ids):
            groups[len(s)].append(i)
        for n, members in sorted(groups.items()):
            for j in range(0, len(members), batch_size):
                chunk = members[j : j + batch_size]
                for i, o in zip(chunk, greedy_batch(model, [ids[i] for i in chunk], bos, eos, budget(n)), strict=True):
                    outputs[i] = o
                bar.update(len(chunk))
    else:
        for i, s in enumerate(ids):
            cfg = GenerationConfig(
                max_new_tokens=budget(len(s)), num_beams=beam, length_penalty=length_penalty, eos_id=eos
            )
            outputs[i] = generate(model, [bos], cfg, source=s)
            bar.update(1)
    bar.close()
    return [tokenizer.decode(o) for o in outputs]


def bleu(hypotheses: list[str], references: list[str]) -> dict[str, Any]:
    """Corpus sacreBLEU (13a tokenization, cased) of detokenized text."""
    import sacrebleu

    metric = sacrebleu.metrics.BLEU()
    score = metric.corpus_score(hypotheses, [references])
    return {"bleu": round(score.score, 2), "signature": str(metric.get_signature()), "detail": str(score)}


@torch.no_grad()
def translation_loss(model: Transformer, tokenizer: Tokenizer, sources: list[str], targets: list[str]) -> float:
    data = TranslationData(sources, targets, tokenizer, max_len=model.config.max_len)
    total, count = 0.0, 0
    for b in data.eval_batches(4096):
        logits = model(b.src, b.tgt_in, b.src_valid, b.tgt_valid)
        _, nll, n = label_smoothed_loss(logits, b.tgt_out, 0.0, ignore_index=data.pad_id)
        total += float(nll) * n
        count += n
    return total / max(count, 1)


# --- the command --------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog="python -m model.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint")
    p.add_argument("--data", required=True, help="LM: a text file; translator: a folder of parallel files")
    p.add_argument("--split", default=None, help="LM: val (default) or full; translator: val, test (default) or a file stem")
    p.add_argument("--limit", type=int, default=None, help="only the first N sentences (translator) / windows (LM)")
    p.add_argument("--beam", type=int, default=4, help="beam size for the beam-search score (1: greedy only)")
    p.add_argument("--length-penalty", type=float, default=0.6)
    p.add_argument("--no-greedy", action="store_true", help="translator: skip the greedy score")
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--src-lang", default="en")
    p.add_argument("--tgt-lang", default="de")
    p.add_argument("--samples", type=int, default=0, help="include this many sample outputs in the JSON")
    p.add_argument("--prompt", default="\n", help="LM: the prompt for samples")
    p.add_argument("--sample-tokens", type=int, default=300, help="LM: tokens per sample")
    p.add_argument("--temperature", type=float, default=0.8, help="LM samples")
    p.add_argument("--top-k", type=int, default=0, help="LM samples")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--progress", action="store_true")
    a = p.parse_args(argv)
    if a.threads > 0:
        torch.set_num_threads(a.threads)
    ckpt = load_checkpoint(a.checkpoint)
    model, tok = ckpt.model, ckpt.tokenizer
    start = time.perf_counter()
    result: dict[str, Any] = {"checkpoint": str(a.checkpoint), "data": str(a.data)}
    if isinstance(model, DecoderOnlyLM):
        split = a.split or "val"
        ids = encode_chars(tok, lm_text(tok, a.data, split))
        loss, n = lm_loss(model, ids, limit=a.limit)
        result.update(task="lm", split=split, loss=round(loss, 4), perplexity=round(math.exp(loss), 3), tokens=n)
        samples = []
        for i in range(a.samples):
            cfg = GenerationConfig(max_new_tokens=a.sample_tokens, temperature=a.temperature, top_k=a.top_k, seed=a.seed + i)
            prompt = tok.encode(a.prompt)
            samples.append(a.prompt + tok.decode(generate(model, prompt, cfg)))
        if samples:
            result["samples"] = samples
    else:
        split = a.split or "test"
        sources, references = read_parallel(a.data, split, a.src_lang, a.tgt_lang)
        if a.limit is not None:
            sources, references = sources[: a.limit], references[: a.limit]
        result.update(task="translation", split=split, sentences=len(sources))
        result["loss"] = round(translation_loss(model, tok, sources, references), 4)
        outputs: dict[str, list[str]] = {}
        if not a.no_greedy:
            outputs["greedy"] = translate(model, tok, sources, 1, max_new_tokens=a.max_new_tokens, progress=a.progress)
            result["greedy"] = bleu(outputs["greedy"], references)
        if a.beam > 1:
            key = f"beam{a.beam}"
            outputs[key] = translate(
                model, tok, sources, a.beam, a.length_penalty, max_new_tokens=a.max_new_tokens, progress=a.progress
            )
            result[key] = {**bleu(outputs[key], references), "length_penalty": a.length_penalty}
        if a.samples:
            result["samples"] = [
                {"source": sources[i], "reference": references[i], **{k: v[i] for k, v in outputs.items()}}
                for i in range(min(a.samples, len(sources)))
            ]
    result["seconds"] = round(time.perf_counter() - start, 1)
    print(json.dumps(result, indent=2, ensure_ascii=False))
    return result


if __name__ == "__main__":
    main()

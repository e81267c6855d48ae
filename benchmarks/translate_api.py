"""The shipped translator's sacreBLEU through the HTTP API: greedy and beam search, next to in-process greedy.

    python -m benchmarks.translate_api --data path/to/multi30k [--checkpoint model/checkpoints/multi30k-en-de]
        [--limit 200] [--beam 4] [--length-penalty 0.6] [--concurrency 8] [--out FILE.json]

Starts our server (`python -m service`, a subprocess on 127.0.0.1) with only the checkpoint, sends each of the
first --limit sentences of the test split to POST /v1/completions twice, greedy (temperature 0) and beam search
(use_beam_search, n = --beam, choices[0] the best), at most --concurrency requests in flight, and scores each set
of outputs with sacreBLEU against the references. The choices mirror `python -m model.evaluate CHECKPOINT --data
DIR --split test --limit N --beam 4`: the same sentences (model.data.read_parallel), the same max_new_tokens per
sentence (2 x its source tokens + 10, within the decoder's context after BOS) and the same sacreBLEU settings
(model.evaluate.bleu), so the numbers compare with the in-process ones. As a check, once the server has stopped,
model.evaluate.translate decodes the same sentences in-process, greedy and with the same beam; for each, the
number of sentences whose API output differs from it is reported (it should be 0). Prints the JSON and writes it
to --out."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from tqdm import tqdm

from benchmarks.run_cpu import Plan, free_port, our_server, running
from model.checkpoint import load_checkpoint
from model.data import read_parallel
from model.evaluate import bleu, translate
from model.tokenizer import Tokenizer
from model.transformer import Transformer

DEFAULT_CHECKPOINT = Path("model/checkpoints/multi30k-en-de")


def budget(tokenizer: Tokenizer, source: str, max_len: int) -> int:
    """model.evaluate.translate's max_new_tokens for one source, 2n + 10 within the context: its greedy stops at
    max_len - 1 generated tokens (BOS takes a position), which is also the most the server accepts."""
    n = len(tokenizer.encode(source)[:max_len])
    return min(max_len - 1, 2 * n + 10)


async def complete_all(url: str, model: str, sources: list[str], budgets: list[int], extra: dict[str, Any],
                       concurrency: int, desc: str) -> tuple[list[str], list[str]]:
    """choices[0].text of POST /v1/completions for each source (in order), and the errors met (empty text)."""
    gate = asyncio.Semaphore(concurrency)
    outputs = [""] * len(sources)
    errors: list[str] = []
    bar = tqdm(total=len(sources), desc=desc, disable=not sys.stderr.isatty(), file=sys.stderr)

    async def one(client: httpx.AsyncClient, i: int) -> None:
        body = {"model": model, "prompt": sources[i], "max_tokens": budgets[i], **extra}
        async with gate:
            try:
                r = await client.post(f"{url}/v1/completions", json=body)
                r.raise_for_status()
                outputs[i] = r.json()["choices"][0]["text"]
            except (httpx.HTTPError, KeyError, IndexError, ValueError) as e:
                detail = e.response.text[:200] if isinstance(e, httpx.HTTPStatusError) else repr(e)
                errors.append(f"sentence {i}: {detail}")
        bar.update(1)

    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0)) as client:
        await asyncio.gather(*(one(client, i) for i in range(len(sources))))
    bar.close()
    return outputs, errors


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog="python -m benchmarks.translate_api", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="the folder of Multi30k's parallel files (test_2016_flickr.*.gz)")
    p.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT)
    p.add_argument("--split", default="test", help="val, test or a file stem (as model.evaluate)")
    p.add_argument("--limit", type=int, default=200, help="the first N sentences of the split")
    p.add_argument("--beam", type=int, default=4, help="beam width (the request's n)")
    p.add_argument("--length-penalty", type=float, default=0.6, help="GNMT alpha of the beam requests")
    p.add_argument("--concurrency", type=int, default=8, help="requests in flight at once")
    p.add_argument("--no-check", action="store_true", help="skip the in-process comparison")
    p.add_argument("--server-arg", action="append", default=[], metavar="FLAG",
                   help="one more flag for the server, e.g. --server-arg=--no-enable-prefix-caching (repeatable)")
    p.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    a = p.parse_args(argv)

    start = time.perf_counter()
    sources, references = read_parallel(a.data, a.split)
    sources, references = sources[: a.limit], references[: a.limit]
    ckpt = load_checkpoint(a.checkpoint)
    if not isinstance(ckpt.model, Transformer):
        raise SystemExit(f"{a.checkpoint} is a language model; this measures a translator")
    model = ckpt.model.eval()
    cap = model.config.max_len
    budgets = [budget(ckpt.tokenizer, s, cap) for s in sources]
    name = a.checkpoint.name
    seconds: dict[str, float] = {}
    errors: dict[str, list[str]] = {}
    greedy_extra = {"temperature": 0}
    beam_extra = {"use_beam_search": True, "n": a.beam, "length_penalty": a.length_penalty}
    # KV pool for every beam of every request in flight at the full context (run_cpu sizes it from the plan)
    plan = Plan(models=(name,), dtypes=("float32",), input_len=cap, output_len=cap,
                concurrency=(a.concurrency * a.beam,))
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        cmd = our_server(plan, a.checkpoint, "float32", port) + a.server_arg
        with running(cmd, port, Path(tmp) / "server.log") as url:
            seconds["server_start"] = time.perf_counter() - t
            t = time.perf_counter()
            greedy, errors["greedy"] = asyncio.run(
                complete_all(url, name, sources, budgets, greedy_extra, a.concurrency, "greedy"))
            seconds["greedy"] = time.perf_counter() - t
            t = time.perf_counter()
            beams, errors["beam"] = asyncio.run(
                complete_all(url, name, sources, budgets, beam_extra, a.concurrency, f"beam {a.beam}"))
            seconds["beam"] = time.perf_counter() - t

    result: dict[str, Any] = {
        "checkpoint": name, "data": Path(a.data).name, "split": a.split, "sentences": len(sources),
        "concurrency": a.concurrency, "server_args": a.server_arg,
        "max_tokens": "2 x source tokens + 10, at most max_len - 1 (model.evaluate)",
        "greedy": {**bleu(greedy, references), "request": greedy_extra},
        "beam": {"width": a.beam, "length_penalty": a.length_penalty, **bleu(beams, references),
                 "request": beam_extra},
        "request_errors": {k: v for k, v in errors.items() if v},
    }
    if not a.no_check:
        for key, width, api in (("greedy", 1, greedy), ("beam", a.beam, beams)):
            t = time.perf_counter()
            local = translate(model, ckpt.tokenizer, sources, width, a.length_penalty)
            seconds[f"inprocess_{key}"] = time.perf_counter() - t
            differ = [i for i, (x, y) in enumerate(zip(api, local, strict=True)) if x != y]
            result[f"inprocess_{key}"] = {"bleu": bleu(local, references)["bleu"],
                                          "sentences_differing": len(differ), "first_differing": differ[:10]}
    seconds["total"] = time.perf_counter() - start
    result["seconds"] = {k: round(v, 1) for k, v in seconds.items()}
    text = json.dumps(result, indent=2, ensure_ascii=False)
    print(text)
    if a.out is not None:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(text + "\n", encoding="utf-8")
    return result


if __name__ == "__main__":
    main()

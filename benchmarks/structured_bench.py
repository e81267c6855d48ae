"""Structured output under load: what holding half the streams to a JSON schema costs the others and itself.

    python -m benchmarks.structured_bench                           # SmolLM2-135M, float32, CPU, ~2 minutes
    python -m benchmarks.structured_bench --models shakespeare-gpt  # a character model: a regex, not JSON

One server (prefix caching off where it can be), the same prompts in both runs: (b) --streams streams, each
sending its requests one after another until it has --tokens-per-stream output tokens, every other stream's
requests held to one of SCHEMAS (`structured_outputs: {"json": ...}`, /v1/completions); then (a) the same
streams replaying (b)'s requests unconstrained, each with max_tokens = the length it had in (b). All set
ignore_eos, so both runs generate as many tokens in the same requests (a completed JSON ends its request early,
"stop"): only the grammar differs, and (b)/(a) output tok/s is its cost, against 15%. Also reported: TTFT and
ITL medians, each schema's cold compile time (`Grammars.compile_now` in-process on the model's tokenizer) and
the TTFT of its first request (compiled by the server) against a second's; each completed constrained output
is validated. Writes structured-<model>-<dtype>.json and .md to benchmarks/results/<date>-<device>/ (or --out)
and prints the .md."""

from __future__ import annotations

import argparse
import asyncio
import datetime
import functools
import itertools
import json
import logging
import random
import re
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import jsonschema
from gguf import GGUFReader
from tqdm import tqdm

from benchmarks.checkpoints import is_gguf, model_config, served_name
from benchmarks.plan import Plan, our_server
from benchmarks.prefix_bench import FLAG, caching_flag_supported, checkpoint_for
from benchmarks.report import markdown_table
from benchmarks.roofline import cpu_identity
from benchmarks.run_cpu import RESULTS, free_port, running
from benchmarks.serve_bench import summarize
from benchmarks.serve_client import RequestResult, _tick, sse_events
from model.checkpoint import load_checkpoint
from model.fetch import FetchError
from model.gguf_tokenizer import tokenizer_from_gguf
from service.engine.request import Constraint
from service.engine.structured import ConstraintError, Grammars

log = logging.getLogger("benchmarks")
TOLERANCE = 0.15  # the bar: (b) within 15% of (a)
_S = lambda n: {"type": "string", "maxLength": n}  # noqa: E731
_INT = lambda lo, hi: {"type": "integer", "minimum": lo, "maximum": hi}  # noqa: E731

_obj = lambda **props: {"type": "object", "properties": props, "required": list(props),  # noqa: E731
                        "additionalProperties": False}

SCHEMAS: dict[str, dict[str, Any]] = {  # every output bounded: capped strings, ranged integers, enums, maxItems
    "user": _obj(name=_S(16), age=_INT(0, 120), role={"enum": ["admin", "editor", "viewer"]}),
    "order": _obj(id=_INT(1, 99999), paid={"type": "boolean"},
                  items={"type": "array", "maxItems": 3, "items": _obj(sku=_S(8), qty=_INT(1, 9))}),
    "event": _obj(title=_S(24), day={"enum": ["mon", "tue", "wed", "thu", "fri"]},
                  place=_obj(city=_S(12), floor=_INT(0, 50))),
    "review": _obj(stars=_INT(1, 5), summary=_S(32),
                   tags={"type": "array", "maxItems": 2, "items": {"enum": ["fast", "cheap", "good"]}}),
}
REGEX = r"[A-Z][a-z]{2,10}(, [a-z]{2,10}){2,5}[.!?]"  # a character vocabulary has no braces: this instead
NAMES = {"json": list(SCHEMAS), "regex": ["regex"]}
BODIES = {name: {"structured_outputs": {"json": s}} for name, s in SCHEMAS.items()} | {
    "regex": {"structured_outputs": {"regex": REGEX}}}


@dataclass
class Result(RequestResult):
    """One request as the client saw it, with its text, finish reason and constraint ("" for none)."""

    text: str = ""
    finish: str = ""
    schema: str = ""


async def send(client: aiohttp.ClientSession, url: str, model: str, prompt: list[int], max_tokens: int,
               extra: dict[str, Any], r: Result) -> None:
    """One streamed /v1/completions request (serve_client.send_openai's, with a constraint and the text)."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}, **extra}
    start = last = time.perf_counter()
    async with client.post(f"{url}/v1/completions", json=body) as resp:
        if resp.status != 200:
            r.error = f"HTTP {resp.status}: {(await resp.text(errors='replace'))[:200]}"
            return
        async for _, data in sse_events(resp):
            if data == "[DONE]":
                r.ok = not r.error
                break
            chunk = json.loads(data)
            r.error = str(chunk["error"])[:200] if "error" in chunk else r.error
            choice = (chunk.get("choices") or [{}])[0]
            if choice.get("text") or (choice and not choice.get("finish_reason")):
                last = _tick(r, start, last)
                r.output_tokens += 1
            r.text, r.finish = r.text + (choice.get("text") or ""), choice.get("finish_reason") or r.finish
            if chunk.get("usage"):
                r.output_tokens = chunk["usage"]["completion_tokens"]
    r.latency = time.perf_counter() - start


def stats(results: list[Result], seconds: float) -> dict[str, Any]:
    out = summarize([r for r in results], seconds)  # a list of RequestResult
    return {"requests": len(results), **{k: v for k, v in out.items() if not k.startswith(("mean", "p99"))}}


async def run(post: Callable[..., Awaitable[None]], prompts: list[list[int]], a: argparse.Namespace, kind: str,
              replay: list[list[Result]] | None, progress: bool) -> tuple[dict[str, Any], list[list[Result]]]:
    """(b) without `replay`: each stream sends requests until it has a.tokens_per_stream output tokens, the odd
    streams' held to NAMES[kind] in turn; (a) with it: each stream's (b) requests again, unconstrained, each
    with max_tokens = its length in (b)."""
    sent: list[list[Result]] = [[] for _ in range(a.streams)]
    total = a.streams * a.tokens_per_stream if replay is None else sum(r.output_tokens for s in replay for r in s)
    bar = tqdm(total=total, unit="tok", desc="(a) unconstrained" if replay else "(b) half constrained",
               disable=not progress, leave=False)

    async def stream(i: int) -> None:
        name = NAMES[kind][(i // 2) % len(NAMES[kind])] if i % 2 else ""
        extra: dict[str, Any] = {}
        for k in itertools.count():
            if replay is not None:
                if k == len(replay[i]):
                    return
                extra, max_tokens = {}, replay[i][k].output_tokens
            elif sum(r.output_tokens for r in sent[i]) >= a.tokens_per_stream:
                return
            else:
                extra, max_tokens = BODIES[name] if name else {}, a.max_tokens
            sent[i].append(r := Result(prompt_tokens=a.input_len, schema=name))
            try:
                await post(prompts[(i + k * a.streams) % len(prompts)], max_tokens, extra, r)
            except aiohttp.ClientError as e:
                r.error = f"{type(e).__name__}: {e}"[:200]
            bar.update(r.output_tokens)
            if r.error or not r.output_tokens:  # a stream that fails stops (its failures are counted)
                return

    start = time.perf_counter()
    await asyncio.gather(*(stream(i) for i in range(a.streams)))
    seconds, all_ = time.perf_counter() - start, [r for s in sent for r in s]
    bar.close()
    out = {**stats(all_, seconds), "held_streams": stats([r for s in sent[1::2] for r in s], seconds),
           "free_streams": stats([r for s in sent[::2] for r in s], seconds)}
    if replay is None:
        held = [r for r in all_ if r.schema and r.ok]
        out |= {"finish_reasons": {f: sum(r.finish == f for r in held) for f in ("stop", "length")},
                "outputs": [{"schema": r.schema, "text": r.text, "finish_reason": r.finish} for r in held]}
    return out, sent


async def serve_runs(url: str, model: str, a: argparse.Namespace, kind: str, progress: bool) -> dict[str, Any]:
    """Warm-up; per constraint, the TTFT of its first request (the server compiles it; the first one also reads
    the vocabulary into xgrammar) and of a second (cached), new prompts; then run (b), then run (a)."""
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                     timeout=aiohttp.ClientTimeout(total=600)) as client:
        async with client.get(f"{url}/tokenizer_info", params={"model": model}) as resp:
            info = await resp.json()
        special = {info.get(f"{k}_token_id") for k in ("bos", "eos", "pad", "unk")}
        pool, rng = [i for i in range(int(info["vocab_size"])) if i not in special], random.Random(a.seed)
        prompts = [[rng.choice(pool) for _ in range(a.input_len)] for _ in range(a.streams * 16 + 16)]
        post = functools.partial(send, client, url, model)
        await asyncio.gather(*(post(p, 8, {}, Result()) for p in prompts[: a.streams]))  # warm-up, every stream
        res: dict[str, Any] = {"first_requests": {}}
        for i, name in enumerate(NAMES[kind]):
            first, second = Result(), Result()
            await post(prompts[-2 - 2 * i], 1, BODIES[name], first)
            await post(prompts[-3 - 2 * i], 1, BODIES[name], second)
            res["first_requests"][name] = {"first_ttft_ms": 1000 * first.ttft, "cached_ttft_ms": 1000 * second.ttft,
                                           "error": first.error or second.error or None}
        res["constrained"], sent = await run(post, prompts[:-16], a, kind, None, progress)
        replay = [[r for r in s if r.ok] for s in sent]
        res["unconstrained"], _ = await run(post, prompts[:-16], a, kind, replay, progress)
    return res


def compile_times(checkpoint: Path, reps: int) -> tuple[str, dict[str, Any]]:
    """("json", or "regex" where the vocabulary cannot spell the schemas) and each constraint's cold compile ms
    in-process (median of reps, xgrammar's cache cleared between) with the Grammars constructor's."""
    gguf = is_gguf(checkpoint)  # a GGUF file's tokenizer without its weights (reading those takes ~25 s)
    tok = tokenizer_from_gguf(GGUFReader(str(checkpoint))).tokenizer if gguf else load_checkpoint(checkpoint).tokenizer
    vocab_size, t = model_config(checkpoint).vocab_size, time.perf_counter()
    grammars = Grammars(tok, vocab_size)
    times: dict[str, Any] = {"tokenizer_setup_ms": 1000 * (time.perf_counter() - t)}
    kind, specs = "json", {name: json.dumps(schema) for name, schema in SCHEMAS.items()}
    try:
        grammars.compile_now(Constraint(kind, specs["user"]))
    except ConstraintError as e:
        log.info("%s cannot spell the JSON schemas (%s): a regex instead", checkpoint.name, e)
        kind, specs = "regex", {"regex": REGEX}
    for name, spec in specs.items():
        for _ in range(reps):
            grammars.compiler.clear_cache()
            grammars.compile_now(Constraint(kind, spec))
        times[name] = 1000 * statistics.median(grammars.compile_seconds[-reps:])
    grammars.close()
    return kind, times


def check(res: dict[str, Any], kind: str) -> dict[str, int]:
    """Of the constrained outputs the grammar completed ("stop"), how many validate (JSON) or match (regex)."""
    done, valid = [o for o in res["constrained"]["outputs"] if o["finish_reason"] == "stop"], 0
    for o in done:
        try:
            if kind == "json":
                jsonschema.validate(json.loads(o["text"]), SCHEMAS[o["schema"]])
            valid += kind == "json" or bool(re.fullmatch(REGEX, o["text"]))
        except (ValueError, jsonschema.ValidationError):
            pass
    return {"checked": len(done), "valid": valid}


def table(res: dict[str, Any]) -> str:
    a, b, first = res["unconstrained"], res["constrained"], res["first_requests"]
    fmt = lambda v: "-" if v is None else f"{v:.1f}" if isinstance(v, float) else str(v)  # noqa: E731
    runs = (a, b, a["held_streams"], b["held_streams"], a["free_streams"], b["free_streams"])
    rows = [[label, *(fmt(r[key]) for r in runs)]
            for label, key in (("output tok/s", "output_throughput"), ("output tokens", "total_output_tokens"),
                               ("requests", "requests"), ("TTFT median ms", "median_ttft_ms"),
                               ("ITL median ms", "median_itl_ms"), ("seconds", "duration_s"))]
    compiles = [[name, fmt(res["compile_ms"][name]), fmt(first[name]["first_ttft_ms"]),
                 fmt(first[name]["cached_ttft_ms"])] for name in first]
    return "\n".join([
        f"## Structured output: {res['model']} {res['dtype']}\n",
        f"{res['streams']} streams of {res['tokens_per_stream']} output tokens, {res['input_len']}-token prompts, "
        f"max_tokens {res['max_tokens']} (greedy, ignore_eos), {res['device']}; in (b) the odd streams are held to "
        f"{'JSON schemas' if res['kind'] == 'json' else 'a regex'}, (a) replays (b)'s requests and lengths "
        f"unconstrained. CPU: {res['cpu']}.\n",
        markdown_table(["metric", "(a) all", "(b) all", "(a) odd streams", "(b) odd streams: held",
                        "(a) even streams", "(b) even streams: free"], rows), "",
        f"Output throughput (b)/(a): **{res['ratio']:.3f}**, {'within' if res['within_tolerance'] else 'NOT within'}"
        f" {TOLERANCE:.0%}. Constrained outputs: {b['finish_reasons']['stop']} completed by the grammar (of them "
        f"{res['validation']['valid']} valid), {b['finish_reasons']['length']} cut at max_tokens.\n",
        markdown_table(["constraint", "cold compile ms (in-process)", "first request's TTFT ms (compiles)",
                        "second request's TTFT ms (cached)"], compiles), "",
        f"Reading the vocabulary into xgrammar (once per model): {res['compile_ms']['tokenizer_setup_ms']:.0f} ms.",
    ]) + "\n"


def run_model(a: argparse.Namespace, checkpoint: Path, dtype: str, out: Path, progress: bool) -> dict[str, Any]:
    model, (kind, compile_ms) = served_name(checkpoint), compile_times(checkpoint, a.compile_reps)
    cpu, flags = cpu_identity()
    res: dict[str, Any] = {"model": model, "dtype": dtype, "kind": kind, "streams": a.streams,
                           "tokens_per_stream": a.tokens_per_stream, "input_len": a.input_len,
                           "max_tokens": a.max_tokens, "device": a.device, "cpu": cpu, "cpu_flags": list(flags),
                           "compile_ms": compile_ms,
                           "constraints": {name: BODIES[name]["structured_outputs"] for name in NAMES[kind]}}
    plan = Plan(models=(model,), dtypes=(dtype,), device=a.device, input_len=a.input_len, output_len=a.max_tokens,
                concurrency=(a.streams,), threads=a.threads)
    port = free_port()
    cmd = our_server(plan, checkpoint, dtype, port) + ([FLAG] if caching_flag_supported() else [])
    with running(cmd, port, out / "logs" / f"structured-{model}-{dtype}.log") as url:
        res |= asyncio.run(serve_runs(url, model, a, kind, progress))
    res["ratio"] = res["constrained"]["output_throughput"] / res["unconstrained"]["output_throughput"]
    res["within_tolerance"] = res["ratio"] >= 1 - TOLERANCE
    res["validation"] = check(res, kind)
    return res


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.structured_bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="smollm2-135m", help="benchmark model names or checkpoint folders")
    for flag, kind, default in (("--dtypes", str, "float32"), ("--streams", int, 32), ("--tokens-per-stream", int, 192),
                                ("--input-len", int, 32), ("--max-tokens", int, 96), ("--compile-reps", int, 3),
                                ("--device", str, "cpu"), ("--threads", int, None), ("--seed", int, 0)):
        p.add_argument(flag, type=kind, default=default, help="default: %(default)s")
    p.add_argument("--work-dir", type=Path, default=Path.home() / ".cache" / "attnserve-bench")
    p.add_argument("--out", type=Path, help="results folder (default: benchmarks/results/<date>-<device>)")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", stream=sys.stderr)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    (out := a.out or RESULTS / f"{datetime.date.today().isoformat()}-{a.device}").mkdir(parents=True, exist_ok=True)
    for name in a.models.split(","):
        try:
            checkpoint = checkpoint_for(name, a.work_dir)
        except FetchError as e:
            log.warning("skipping %s: its weights could not be downloaded (%s)", name, e)
            continue
        for dtype in a.dtypes.split(","):
            res = run_model(a, checkpoint, dtype, out, sys.stderr.isatty())
            stem = f"structured-{res['model']}-{dtype}"
            (out / f"{stem}.json").write_text(json.dumps(res, indent=2) + "\n")
            (out / f"{stem}.md").write_text(table(res))
            sys.stdout.write(table(res) + "\n")
    log.info("wrote %s", out)


if __name__ == "__main__":
    main()

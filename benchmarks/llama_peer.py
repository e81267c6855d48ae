"""llama.cpp's `llama-server` as the peer in `make bench`: the row's weights converted to GGUF by llama.cpp's own
converter, served with continuous batching in as many slots as the row's highest concurrency, and driven by our
load generator (OpenAI `/v1/completions`, streaming, the same token-id prompts our server got, `ignore_eos`).

    python -m benchmarks.llama_peer --hf-folder FOLDER --precision f32 --concurrency 2 --num-prompts 4

Precision classes: our float32 against its F32 (KV cache f32), our bfloat16 against its F16 (KV cache f16), our
int8 (`--quantization int8`; KV cache bfloat16, also under float32 activations) against its Q8_0 (KV cache f16,
llama.cpp's default)."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import os
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from benchmarks import llama_cpp
from benchmarks.gguf_convert import TANH_GELU
from benchmarks.plan import Plan, int8_missing
from benchmarks.serve_bench import LoadSpec, Prompt, run_sweep

log = logging.getLogger("benchmarks")
SYSTEM = "llama.cpp server"
OUTTYPE = {"float32": "f32", "bfloat16": "f16", "int8": "q8_0"}  # our dtype -> llama.cpp's file type
LABEL = {"f32": "F32", "f16": "F16", "q8_0": "Q8_0"}
KV_TYPE = {"f32": "f32", "f16": "f16", "q8_0": "f16"}


def slot_context(plan: Plan) -> int:
    """Tokens of context each slot needs: the prompt, the output and a margin, rounded up to 256 (llama.cpp pads
    each slot's context to a multiple of 256 anyway)."""
    return 256 * math.ceil((plan.input_len + plan.output_len + 16) / 256)


def server_cmd(server: Path, gguf: Path, outtype: str, port: int, plan: Plan) -> list[str]:
    """llama-server with one slot per stream of the row's highest concurrency, each of `slot_context` tokens
    (`-c` is split evenly between the slots), continuous batching, the row's KV precision; its prompt caches
    (reuse of a slot's previous prompt, the host-memory prompt cache) off, so no request reuses another's work."""
    slots = max(plan.concurrency)
    threads = plan.threads or os.cpu_count() or 1
    return [str(server), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port), "-t", str(threads),
            "-tb", str(threads), "--parallel", str(slots), "--cont-batching", "-c", str(slots * slot_context(plan)),
            "--cache-type-k", KV_TYPE[outtype], "--cache-type-v", KV_TYPE[outtype], "--no-cache-prompt",
            "--cache-ram", "0", "--no-webui"]


def peer_setup(plan: Plan, dtypes_given: bool, skipped: list[str]) -> Plan:
    """The plan with llama.cpp's binaries built once (or the peer off, and why in `skipped`) and the int8 row in
    its dtypes where our server accepts `--quantization int8` (by default on CPU, or when --dtypes names it)."""
    dtypes = plan.dtypes
    if not dtypes_given and plan.device == "cpu" and "int8" not in dtypes:
        dtypes += ("int8",)
    if "int8" in dtypes:
        why = int8_missing()
        if why:
            log.info("no int8 row: %s", why)
            skipped.append(f"int8 (ours with --quantization int8 against llama.cpp's Q8_0): {why}")
            dtypes = tuple(d for d in dtypes if d != "int8")
    if plan.llama_cpp:
        try:
            log.info("llama.cpp: %s", llama_cpp.ensure(progress=True))
        except llama_cpp.Unavailable as e:
            log.warning("llama.cpp server left out: %s", e)
            skipped.append(f"llama.cpp server: {str(e).splitlines()[0]} (`python -m benchmarks.llama_cpp build` "
                           "builds it once the tools and PyPI are there; --no-llama-cpp leaves it out)")
            plan = replace(plan, llama_cpp=False)
    return replace(plan, dtypes=dtypes)


def gguf_file(hf_folder: Path, outtype: str, work_dir: Path) -> Path:
    """The folder's weights as GGUF of `outtype`, converted once under work_dir/gguf/."""
    return llama_cpp.convert(hf_folder, outtype, work_dir / "gguf" / f"{hf_folder.name}-{outtype}.gguf")


def run_peer(plan: Plan, name: str, hf_folder: Path, served: str, dtype: str, prompts: list[Prompt],
             work_dir: Path, logs: Path) -> dict[str, Any]:
    """The row's sweep on llama-server: the same levels and prompt counts as ours and the same prompts (the
    warm-up's first, then each level's in order), no long-prompt level; or {"skipped": why}."""
    from benchmarks.run_cpu import free_port, running  # run_cpu imports this module

    server = llama_cpp.binary("llama-server")
    if server is None:
        return {"skipped": f"llama-server is not built ({llama_cpp.bin_dir()})"}
    outtype = OUTTYPE[dtype]
    try:
        gguf = gguf_file(hf_folder, outtype, work_dir)
    except (llama_cpp.Unavailable, OSError) as e:
        lines = str(e).strip().splitlines() or [""]
        return {"skipped": f"no {LABEL[outtype]} GGUF: {lines[0][:150]} {lines[-1][:200] if len(lines) > 1 else ''}"}
    port = free_port()
    cmd = server_cmd(server, gguf, outtype, port, plan)
    try:
        with running(cmd, port, logs / f"llama-cpp-{name}-{dtype}.log", timeout=300, ready="/health") as url:
            spec = LoadSpec(url, served, "openai", plan.input_len, plan.output_len)
            res = asyncio.run(run_sweep(spec, list(plan.concurrency), plan.prompts(name, plan.concurrency),
                                        progress=sys.stderr.isatty(), prompts=prompts,
                                        one_stream_runs=plan.one_stream_runs))
    except RuntimeError as e:
        return {"skipped": str(e)}
    hf = json.loads((hf_folder / "config.json").read_text())
    act = hf.get("activation_function", "gelu_new")
    note = ({"note": f"llama.cpp's GPT-2 graph computes the tanh GELU; this model's is {act}: the same weights, an "
                     "activation that differs by < 1e-3"} if hf.get("model_type") == "gpt2" and act not in TANH_GELU
            else {})
    return {"system": SYSTEM, "precision": LABEL[outtype], **note, "kv_cache": KV_TYPE[outtype], "gguf": gguf.name,
            "gguf_bytes": gguf.stat().st_size, "version": f"llama-cpp-python {llama_cpp.VERSION}'s llama.cpp",
            "command": [Path(cmd[0]).name, cmd[1], gguf.name, *cmd[3:]], **res}  # no path of this machine


def main(argv: list[str] | None = None) -> None:
    """A smoke run without our server: random token-id prompts over the folder's vocabulary."""
    import random

    p = argparse.ArgumentParser(prog="python -m benchmarks.llama_peer", description=__doc__.split("\n\n")[0])
    p.add_argument("--hf-folder", type=Path, required=True)
    p.add_argument("--dtype", choices=sorted(OUTTYPE), default="float32")
    p.add_argument("--concurrency", default="2")
    p.add_argument("--num-prompts", type=int, default=4)
    p.add_argument("--input-len", type=int, default=32)
    p.add_argument("--output-len", type=int, default=16)
    p.add_argument("--threads", type=int)
    p.add_argument("--work-dir", type=Path, default=Path.home() / ".cache" / "attnserve-bench")
    a = p.parse_args(argv)
    conc = tuple(int(x) for x in a.concurrency.split(","))
    plan = Plan(input_len=a.input_len, output_len=a.output_len, concurrency=conc, threads=a.threads,
                min_prompts={a.hf_folder.name: a.num_prompts}, waves={a.hf_folder.name: 1})
    vocab = json.loads((a.hf_folder / "config.json").read_text())["vocab_size"]
    rng = random.Random(0)
    prompts = [Prompt("", [rng.randrange(vocab) for _ in range(a.input_len)]) for _ in range(1 + a.num_prompts * len(conc))]
    res = run_peer(plan, a.hf_folder.name, a.hf_folder, a.hf_folder.name, a.dtype, prompts, a.work_dir,
                   a.work_dir / "logs")
    from benchmarks.report import levels_table

    if "levels" in res:
        sys.stdout.write(levels_table(res["levels"]) + "\n")
        for lv in res["levels"]:  # every request exactly --output-len tokens, counted by the server's usage
            sys.stdout.write(f"c={lv['concurrency']}: {lv['completed']} ok, {lv['failed']} failed, "
                             f"{lv['total_output_tokens']} output tokens, {lv['total_input_tokens']} prompt tokens\n")
    sys.stdout.write(json.dumps({k: v for k, v in res.items() if k != "levels"}, indent=1)[:3000] + "\n")


if __name__ == "__main__":
    main()

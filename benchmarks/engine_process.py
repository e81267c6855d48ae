"""The engine core process against the engine thread, and against a baseline checkout, on the same weights in one
run: time per output token at one stream against the engine's own decode step (the hand-off's cost), and output
throughput at 32 streams; the core process with one HTTP frontend and with two (--api-server-count 2).

    python -m benchmarks.engine_process --model ~/.cache/attnserve/smollm2-135m-instruct.gguf \\
        --baseline ../attnserve-before --out benchmarks/results/<date>-cpu

Each server is started alone (`python -m service --no-default-models --model M --dtype D`), driven by the
serve_bench load generator on this machine (native API, streamed, greedy, ignore_eos), then stopped. Run it alone:
load under 0.5, nothing else running."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

from benchmarks.roofline import cpu_identity
from benchmarks.run_cpu import free_port, running
from benchmarks.serve_bench import LoadSpec, run_sweep

ROOT = Path(__file__).resolve().parent.parent


def serve(tree: Path, model: Path, dtype: str, extra: list[str], spec: dict[str, Any], log: Path) -> dict[str, Any]:
    port = free_port()
    cmd = [sys.executable, "-m", "service", "--no-default-models", "--model", str(model), "--dtype", dtype,
           "--port", str(port), "--max-num-seqs", "64", "--kv-cache-blocks", "2048", *extra]
    with running(cmd, port, log, cwd=tree) as url:
        frontends = int(extra[extra.index("--api-server-count") + 1]) if "--api-server-count" in extra else 1
        while log.read_text().count('"msg": "ready"') < frontends:  # every frontend listens before the load
            time.sleep(0.25)
        load = LoadSpec(url, model.stem, "native", spec["input_len"], spec["output_len"])
        return asyncio.run(run_sweep(load, spec["concurrency"], spec["num_prompts"], progress=False))


def row(label: str, result: dict[str, Any], base32: float | None) -> str:
    one, many = result["levels"]
    step = one["server"].get("decode_step_mean_ms", float("nan"))
    tpot = one["median_tpot_ms"]
    ratio = "" if base32 is None else f"{many['output_throughput'] / base32:.2f}x"
    return (f"| {label} | {one['output_throughput']:.1f} | {tpot:.1f} | {step:.1f} | {tpot / step:.2f} | "
            f"{many['output_throughput']:.1f} | {many['median_itl_ms']:.1f} | {ratio} |")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--baseline", type=Path, help="a checkout of the code to compare with (its engine in-process)")
    p.add_argument("--input-len", type=int, default=25)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args(argv)
    spec = {"input_len": a.input_len, "output_len": a.output_len, "concurrency": [1, 32], "num_prompts": [8, 64]}
    runs: list[tuple[str, Path, list[str]]] = []
    if a.baseline is not None:
        runs.append(("baseline (engine thread)", a.baseline.resolve(), []))
    runs += [("engine thread (--engine-in-process)", ROOT, ["--engine-in-process"]),
             ("engine core process (default)", ROOT, []),
             ("engine core process, --api-server-count 2", ROOT, ["--api-server-count", "2"])]
    a.out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {}
    for label, tree, extra in tqdm(runs, desc="servers"):
        results[label] = serve(tree, a.model.expanduser(), a.dtype, extra, spec, a.out / "logs" / "engine-process-server.log")
    base32 = results[runs[0][0]]["levels"][1]["output_throughput"] if a.baseline is not None else None
    cpu, flags = cpu_identity()
    machine = f"{cpu}; flags: {' '.join(flags) or 'none of AVX2/AVX-512/AMX'}"
    lines = [f"# Engine core process vs engine thread: {a.model.stem}, {a.dtype}", "",
             f"CPU: {machine}", "",
             f"Workload: {a.input_len} prompt tokens, {a.output_len} output tokens, greedy, ignore_eos, streamed "
             "(native API); 1 stream = 8 requests one after another, 32 streams = 64 requests.", "",
             "| server | 1 stream tok/s | TPOT median ms | decode step mean ms | TPOT / step | 32 streams tok/s "
             "| ITL median ms at 32 | 32 streams vs baseline |", "|---|---|---|---|---|---|---|---|"]
    lines += [row(label, r, base32) for label, r in results.items()]
    stem = f"engine-process-{a.model.stem}-{a.dtype}"
    (a.out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    (a.out / f"{stem}.json").write_text(json.dumps({"spec": spec, "machine": machine,
                                                    "results": results}, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()

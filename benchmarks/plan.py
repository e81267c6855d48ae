"""What `make bench` (benchmarks.run_cpu) measures: the models, the dtypes, each model's workload, and the
command lines of the servers it starts.

Every model shares the plan's workload unless `workloads` gives it its own. SmolLM2-135M (30 layers, ~135M
parameters: as many weights as GPT-2 small, 2.5x its layers) gets 1 and 32 streams of 64 output tokens, so that
its part of the run stays near 3 minutes for both dtypes on 2 CPU cores, and bfloat16 only where it is the
machine's best dtype (native bf16 instructions, the rule of the server's `--dtype auto`)."""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from benchmarks.checkpoints import MODELS, SMOLLM2

WORKLOADS: dict[str, dict[str, Any]] = {
    SMOLLM2: {"output_len": 64, "concurrency": (1, 32), "native_bf16_only": True},
}


@dataclass(frozen=True)
class Plan:
    """What one run measures; prompt counts are sized so that the default run fits ~8 minutes on 2 cores."""

    models: tuple[str, ...] = MODELS
    dtypes: tuple[str, ...] = ("float32", "bfloat16")
    device: str = "cpu"
    input_len: int = 32
    output_len: int = 128
    concurrency: tuple[int, ...] = (1, 8, 32)
    naive_concurrency: tuple[int, ...] = (1,)
    static_batch: int = 32
    threads: int | None = None
    long_prompt: tuple[int, float] = (200, 1.0)  # the highest level again, a prompt of this many tokens every s
    waves: dict[str, int] = field(default_factory=lambda: {"shakespeare-gpt": 2, "gpt-char": 2, "gpt2-small": 1, SMOLLM2: 1})
    min_prompts: dict[str, int] = field(default_factory=lambda: {"shakespeare-gpt": 8, "gpt-char": 8, "gpt2-small": 2, SMOLLM2: 2})
    naive_prompts: dict[str, int] = field(default_factory=lambda: {"shakespeare-gpt": 4, "gpt-char": 4, "gpt2-small": 1, SMOLLM2: 1})
    native_bf16_only: bool = False  # bfloat16 only on a CUDA device or a CPU with native bf16 instructions
    workloads: dict[str, dict[str, Any]] = field(default_factory=lambda: {k: dict(v) for k, v in WORKLOADS.items()})
    llama_cpp: bool = True  # llama.cpp's llama-server on the same weights in each row (CPU only; benchmarks.llama_peer)
    one_stream_runs: int = 3  # ours and llama.cpp's level at 1 stream: the median of this many runs (serve_bench)

    def for_model(self, name: str) -> Plan:
        """This plan with the model's own workload (output length, levels, ...) in place of the shared one."""
        return replace(self, **self.workloads.get(name, {}))

    def prompts(self, model: str, concurrencies: tuple[int, ...], naive: bool = False) -> list[int]:
        if naive:
            return [max(self.naive_prompts.get(model, 1), c) for c in concurrencies]
        return [max(self.min_prompts.get(model, 2), self.waves.get(model, 1) * c) for c in concurrencies]

    @property
    def mean_context(self) -> float:
        return self.input_len + self.output_len / 2


def without_given(workloads: dict[str, dict[str, Any]], given: set[str]) -> dict[str, dict[str, Any]]:
    """The per-model workloads less the fields the command line set: a flag given applies to every model."""
    return {name: {k: v for k, v in w.items() if k not in given} for name, w in workloads.items()}


def native_bf16_missing(plan: Plan, dtype: str, flags: set[str] | None = None) -> str | None:
    """Why `dtype` is not this machine's best for a model measured only in its best dtypes (None: run it)."""
    if not plan.native_bf16_only or dtype != "bfloat16" or plan.device.startswith("cuda"):
        return None
    from service.engine.device import NATIVE_BF16_FLAGS, cpu_flags

    if (cpu_flags() if flags is None else flags) & set(NATIVE_BF16_FLAGS):
        return None
    return (f"not this machine's best dtype: the CPU has no native bfloat16 instructions "
            f"({' or '.join(NATIVE_BF16_FLAGS)}), so torch emulates them, several times slower than float32 "
            "(the server's --dtype auto picks float32 here)")


def arguments(description: str) -> argparse.ArgumentParser:
    """benchmarks.run_cpu's command line; a workload flag left out keeps each model's own value."""
    d = Plan()
    p = argparse.ArgumentParser(prog="python -m benchmarks.run_cpu", description=description)
    p.add_argument("--models", default=",".join(d.models), help="default: %(default)s")
    p.add_argument("--dtypes", help="default: float32,bfloat16 (SmolLM2: bfloat16 only where the CPU has native "
                   "bf16 instructions), and int8 where our server accepts --quantization int8")
    p.add_argument("--device", default="cpu")
    p.add_argument("--concurrency", help="default: 1,8,32 (SmolLM2: 1,32)")
    p.add_argument("--naive-concurrency", default="1")
    p.add_argument("--input-len", type=int, default=d.input_len)
    p.add_argument("--output-len", type=int, help="default: 128 (SmolLM2: 64)")
    p.add_argument("--static-batch", type=int, default=d.static_batch)
    p.add_argument("--threads", type=int)
    p.add_argument("--budget-s", type=float, default=900.0,
                   help="skip a run predicted to overrun this many seconds in all (0: never skip)")
    p.add_argument("--work-dir", type=Path, default=Path.home() / ".cache" / "attnserve-bench",
                   help="where random-weight checkpoints and Hugging Face exports are made (once)")
    p.add_argument("--out", type=Path, help="results folder (default: benchmarks/results/<date>-<device>)")
    p.add_argument("--no-llama-cpp", dest="llama_cpp", action="store_false",
                   help="leave out llama.cpp's llama-server (built once into ~/.cache/attnserve when missing)")
    return p


def plan_from_args(a: argparse.Namespace) -> Plan:
    d = Plan()
    ints = lambda s: tuple(int(x) for x in s.split(",") if x)  # noqa: E731
    given = {k for k, v in (("output_len", a.output_len), ("concurrency", a.concurrency),
                            ("native_bf16_only", a.dtypes)) if v is not None}
    return replace(d, models=tuple(a.models.split(",")), dtypes=tuple((a.dtypes or ",".join(d.dtypes)).split(",")),
                   device=a.device, input_len=a.input_len, output_len=a.output_len or d.output_len,
                   concurrency=ints(a.concurrency) if a.concurrency else d.concurrency,
                   naive_concurrency=ints(a.naive_concurrency), static_batch=a.static_batch, threads=a.threads,
                   workloads=without_given(d.workloads, given), llama_cpp=a.llama_cpp and a.device == "cpu")


def kv_blocks(plan: Plan, block_size: int = 16) -> int:
    """Enough KV blocks for every stream of the highest concurrency at full length, plus a quarter."""
    per_request = math.ceil((plan.input_len + plan.output_len + 1) / block_size)
    return math.ceil(max(plan.concurrency) * per_request * 1.25) + 8


def int8_missing() -> str | None:
    """Why our server cannot run the int8 row (None: it accepts `--quantization int8`)."""
    import subprocess

    done = subprocess.run([sys.executable, "-m", "service", "--help"], capture_output=True, text=True)
    if "--quantization" in done.stdout and "int8" in done.stdout:
        return None
    return "our server does not accept --quantization int8 yet (its row against llama.cpp's Q8_0 is left out)"


def int8_activations(plan: Plan) -> str:
    """The int8 row's activations: bfloat16 on CUDA or a CPU with native bfloat16 instructions (what `--dtype auto`
    picks there; SmolLM2's perplexity +0.6% over float32 with them, as with float32 ones: benchmarks/precision.py),
    else float32."""
    native = plan.device.startswith("cuda") or native_bf16_missing(replace(plan, native_bf16_only=True),
                                                                   "bfloat16") is None
    return "bfloat16" if native else "float32"


def our_server(plan: Plan, checkpoint: Path, dtype: str, port: int) -> list[str]:
    """Our server in `dtype`; "int8" is the weights quantized to int8 (`--quantization int8`), activations in
    `int8_activations`."""
    precision = (["--dtype", int8_activations(plan), "--quantization", "int8"] if dtype == "int8"
                 else ["--dtype", dtype])
    cmd = [sys.executable, "-m", "service", "--host", "127.0.0.1", "--port", str(port), "--no-default-models",
           "--model", str(checkpoint), "--device", plan.device, *precision, "--kv-cache-blocks",
           str(kv_blocks(plan)), "--max-num-seqs", str(max(64, *plan.concurrency)), "--log-level", "warning"]
    return cmd + (["--threads", str(plan.threads)] if plan.threads else [])


def naive_server(plan: Plan, hf_folder: Path, name: str, dtype: str, port: int) -> list[str]:
    cmd = [sys.executable, "-m", "benchmarks.naive_server", "--model", str(hf_folder), "--name", name,
           "--dtype", dtype, "--device", plan.device, "--port", str(port)]
    return cmd + (["--threads", str(plan.threads)] if plan.threads else [])

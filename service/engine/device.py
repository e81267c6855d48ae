"""Where a model runs and in what precision: `--device auto` and `--dtype auto`.

On CUDA, bfloat16. On a CPU, bfloat16 only where the CPU has native bf16 instructions (AVX-512 BF16 or AMX) and
a model-shaped matmul measures faster there; on CPUs without them (AVX2 only) torch emulates bf16 and it runs
several times slower than float32."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from model.checkpoint import DTYPES

log = logging.getLogger("attnserve.device")

NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
BIG_MATMUL_S = 5e-4  # a decode-shaped float32 matmul slower than this makes a step compute-bound


def pick_device(setting: str) -> str:
    if setting == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if setting == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was asked for but torch sees no CUDA device")
    return setting


def cpu_flags() -> set[str]:
    """The CPU's feature flags (Linux), empty where /proc/cpuinfo is not there."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    return set(line.partition(":")[2].split())


def _matmul_seconds(dtype: torch.dtype, d_model: int, rows: int = 32, reps: int = 8) -> float:
    """Best time of a decode-shaped linear (rows x d_model) @ (d_model x 4 d_model)^T in `dtype`."""
    x, w = torch.randn(rows, d_model, dtype=dtype), torch.randn(4 * d_model, d_model, dtype=dtype)
    for _ in range(3):  # the first calls pay for kernel selection and JIT
        torch.nn.functional.linear(x, w)
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        torch.nn.functional.linear(x, w)
        best = min(best, time.perf_counter() - t)
    return best


def pick_dtype(setting: str, device: str, d_model: int = 768) -> torch.dtype:
    if setting != "auto":
        return DTYPES[setting]
    if device.startswith("cuda"):
        return torch.bfloat16
    if not cpu_flags() & set(NATIVE_BF16_FLAGS):
        return torch.float32
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one core's kernels: a busy neighbour core cannot skew the comparison
    try:
        fp32, bf16 = _matmul_seconds(torch.float32, d_model), _matmul_seconds(torch.bfloat16, d_model)
    finally:
        torch.set_num_threads(threads)
    # A small model's step is bound by per-op overhead, which bf16 does not shrink (and its conversions add
    # to): measured over HTTP, a d_model-256 model streamed 2,152 tok/s in bf16 vs 2,261 in float32 at 32
    # streams, where GPT-2 small (d_model 768) gained 1.7x. So bf16 only where the matmul takes real time.
    choice = torch.bfloat16 if bf16 * 1.3 < fp32 and fp32 > BIG_MATMUL_S else torch.float32
    log.info("dtype auto: %s (a decode-shaped matmul took %.0f us in float32, %.0f us in bfloat16)",
             str(choice).removeprefix("torch."), fp32 * 1e6, bf16 * 1e6)
    return choice

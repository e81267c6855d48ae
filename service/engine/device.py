"""Where a model runs and in what precision: `--device auto` and `--dtype auto`.

On CUDA, bfloat16. On a CPU, bfloat16 only where the CPU has native bf16 instructions (AVX-512 BF16 or AMX) and
a model-shaped matmul measures faster there and its one-row matvec (one stream's step is made of them) is not
slower; on CPUs without them (AVX2 only) torch emulates bf16 and it runs several times slower than float32."""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from model.checkpoint import DTYPES
from model.prepack import PrepackedLinear, can_prepack

log = logging.getLogger("attnserve.device")

NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
BIG_MATMUL_S = 5e-4  # a decode-shaped float32 matmul slower than this makes a step compute-bound
BF16_MIN_SPEEDUP = 1.3  # less gain than this on the matmul is lost to the conversions around it
BF16_MATVEC_SLACK = 1.1  # a one-row matvec this much slower in bf16 loses one stream more than batches gain
MATVEC_BYTES = 64 * 2**20  # the matvec cycles through this many bytes of weight copies: from memory, not cache


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


def _matvec_seconds(dtype: torch.dtype, d_model: int, reps: int = 3) -> float:
    """Mean time of one decode matvec, a row of x @ (d_model x 4 d_model)^T in `dtype`, with the weight read from
    memory (copies cycled through past the cache), as each layer's weights are at one stream; through the kernel
    serving uses (oneDNN prepacked where it packs, model/prepack.py)."""
    x = torch.randn(1, d_model, dtype=dtype)
    linear = torch.nn.Linear(d_model, 4 * d_model, bias=False, dtype=dtype)
    n = max(2, MATVEC_BYTES // (linear.weight.numel() * linear.weight.element_size()))
    copies = [PrepackedLinear(linear) if can_prepack(linear) else copy.deepcopy(linear) for _ in range(n)]
    return best_seconds(lambda c: c(x), copies, reps)


def best_seconds(call: Callable[[Any], object], items: Sequence[Any], rounds: int = 3) -> float:
    """Best mean seconds of `call` per item over `rounds` passes through `items`, after one warm-up pass (which
    pays for kernel selection); distinct items (weight copies larger than the caches) keep reads from memory."""
    best = float("inf")
    for r in range(rounds + 1):
        start = time.perf_counter()
        for item in items:
            call(item)
        if r:
            best = min(best, (time.perf_counter() - start) / len(items))
    return best


def cpu_dtype_choice(fp32_s: float, bf16_s: float, fp32_vec_s: float | None = None,
                     bf16_vec_s: float | None = None) -> tuple[torch.dtype, str]:
    """float32 or bfloat16 for a CPU with native bf16 instructions, from one decode-shaped matmul's time in each,
    and the reason in words (for the start-up log line).

    A small model's step is bound by per-op overhead, which bf16 does not shrink (and its conversions add to):
    measured over HTTP, a d_model-256 model streamed 2,152 tok/s in bf16 vs 2,261 in float32 at 32 streams, where
    GPT-2 small (d_model 768) gained 1.7x. So bf16 only where it is clearly faster and the matmul takes real time."""
    speedup = fp32_s / bf16_s if bf16_s > 0 else float("inf")
    if not bf16_s * BF16_MIN_SPEEDUP < fp32_s:
        return torch.float32, f"bfloat16 is not {BF16_MIN_SPEEDUP:g}x faster ({speedup:.2f}x)"
    if fp32_s <= BIG_MATMUL_S:
        return torch.float32, (f"bfloat16 is {speedup:.2f}x faster on the matmul, but the matmul is too small "
                               f"(<= {BIG_MATMUL_S * 1e6:.0f} us) for that to outweigh per-op overhead")
    if fp32_vec_s is not None and bf16_vec_s is not None and bf16_vec_s > fp32_vec_s * BF16_MATVEC_SLACK:
        return torch.float32, (f"bfloat16 is {speedup:.2f}x faster on the matmul, but {bf16_vec_s / fp32_vec_s:.2f}x "
                               "slower on the one-stream matvec, where a decode step is bound by reading weights")
    vec = f", {fp32_vec_s / bf16_vec_s:.2f}x on the one-stream matvec" if fp32_vec_s and bf16_vec_s else ""
    return torch.bfloat16, f"bfloat16 is {speedup:.2f}x faster on a matmul big enough to matter{vec}"


def pick_kv_dtype(setting: str, dtype: torch.dtype, quantization: str | None) -> torch.dtype:
    """The KV cache's storage for activations in `dtype`: the setting, or for "auto" the activations' dtype, but
    bfloat16 under an int8 model's float32 activations (a CPU without native bfloat16: attention then reads half
    the bytes, the pool holds twice the tokens, and llama.cpp keeps a Q8_0 model's cache in 16 bits too)."""
    if setting != "auto":
        return DTYPES[setting]
    return torch.bfloat16 if quantization == "int8" and dtype == torch.float32 else dtype


def pick_dtype(setting: str, device: str, d_model: int = 768) -> torch.dtype:
    if setting != "auto":
        return DTYPES[setting]
    if device.startswith("cuda"):
        return torch.bfloat16
    if not cpu_flags() & set(NATIVE_BF16_FLAGS):
        log.info("dtype auto: float32: this CPU has no native bfloat16 instructions (%s), so torch would emulate "
                 "them several times slower", " or ".join(NATIVE_BF16_FLAGS))
        return torch.float32
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one core's kernels: a busy neighbour core cannot skew the comparison
    try:
        fp32, bf16 = _matmul_seconds(torch.float32, d_model), _matmul_seconds(torch.bfloat16, d_model)
        fp32_vec, bf16_vec = _matvec_seconds(torch.float32, d_model), _matvec_seconds(torch.bfloat16, d_model)
    finally:
        torch.set_num_threads(threads)
    choice, reason = cpu_dtype_choice(fp32, bf16, fp32_vec, bf16_vec)
    log.info("dtype auto: %s: %s (a decode-shaped matmul took %.0f us in float32, %.0f us in bfloat16; a one-row "
             "matvec from memory %.0f us (%.1f GB/s) in float32, %.0f us (%.1f GB/s) in bfloat16)",
             str(choice).removeprefix("torch."), reason, fp32 * 1e6, bf16 * 1e6,
             fp32_vec * 1e6, 16 * d_model**2 / fp32_vec / 1e9, bf16_vec * 1e6, 8 * d_model**2 / bf16_vec / 1e9)
    return choice

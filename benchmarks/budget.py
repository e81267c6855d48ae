"""Whether a run fits `make bench`'s time budget: predicted from the same model's run in another dtype, scaled by
how much slower a decode-shaped forward is in this dtype on this machine."""

from __future__ import annotations

import logging
import statistics
import time
from pathlib import Path

import torch

from benchmarks.plan import Plan
from model.checkpoint import DTYPES, load_checkpoint

log = logging.getLogger("benchmarks")


def probe_step(model: torch.nn.Module, dtype: str, device: str, batch: int = 8) -> float:
    """Seconds of one forward of `batch` single tokens in `dtype` (the shape of a decode step, no cache): the
    median of 5, on one thread, which other processes on the machine disturb least. Casts `model` in place."""
    model = model.to(device=device, dtype=DTYPES[dtype]).eval()
    x = torch.zeros(batch, 1, dtype=torch.long, device=device)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    times = []
    try:
        with torch.inference_mode():
            for _ in range(6):
                t = time.perf_counter()
                model(x)
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - t)
    finally:
        torch.set_num_threads(threads)
    return statistics.median(times[1:])


def over_budget(plan: Plan, checkpoint: Path, name: str, dtype: str, took: dict[tuple[str, str], float],
                left_s: float) -> str | None:
    """Why a run should be skipped (None: run it). A run is predicted from the same model's run in another
    dtype, scaled by how much slower a decode-shaped forward is in this dtype: on a CPU without native bf16
    kernels (AVX2 only) bf16 runs several times slower than float32, and GPT-2 small would not fit the budget."""
    if left_s <= 0:
        return "the time budget is spent"
    done = [(d, s) for (n, d), s in took.items() if n == name]
    if not done:
        return None
    other, seconds = done[0]
    slower = 1.0  # int8 (weights quantized, activations as plan.int8_activations): predicted from the other run
    if dtype in DTYPES and other in DTYPES:
        model = load_checkpoint(checkpoint).model
        slower = probe_step(model, dtype, plan.device) / probe_step(model, other, plan.device)
        del model
    predicted = seconds * max(1.0, slower)
    log.info("%s %s predicted %.0f s (%s took %.0f s; a %s forward takes %.2fx the time)", name, dtype, predicted,
             other, seconds, dtype, slower)
    if predicted > left_s:
        return (f"predicted to take {predicted:.0f} s ({other} took {seconds:.0f} s; a decode-shaped forward takes "
                f"{slower:.2f}x the time in {dtype} on this machine); {left_s:.0f} s of the time budget were left")
    return None

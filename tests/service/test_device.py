"""`--dtype auto`: float32 on a CPU without native bf16 instructions, bfloat16 on CUDA, and on a CPU with them
whichever a decode-shaped matmul measures faster."""

from __future__ import annotations

import pytest
import torch

from service.engine import device


def test_auto_is_float32_without_native_bf16(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(device, "cpu_flags", lambda: {"avx2", "fma"})
    assert device.pick_dtype("auto", "cpu") == torch.float32
    assert device.pick_dtype("auto", "cuda") == torch.bfloat16
    assert device.pick_dtype("bfloat16", "cpu") == torch.bfloat16


def test_auto_follows_the_measurement_where_bf16_is_native(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(device, "cpu_flags", lambda: {"avx512f", "avx512_bf16"})
    times = {torch.float32: 1e-3, torch.bfloat16: 0.5e-3}
    monkeypatch.setattr(device, "_matmul_seconds", lambda dtype, d_model: times[dtype])
    assert device.pick_dtype("auto", "cpu") == torch.bfloat16
    times[torch.bfloat16] = 0.9e-3  # not 1.3x faster: keep float32
    assert device.pick_dtype("auto", "cpu") == torch.float32
    times.update({torch.float32: 1e-4, torch.bfloat16: 0.3e-4})  # faster, but too small a matmul to matter
    assert device.pick_dtype("auto", "cpu") == torch.float32


def test_this_machines_flags_are_read() -> None:
    flags = device.cpu_flags()
    assert not flags or "fpu" in flags or "sse2" in flags

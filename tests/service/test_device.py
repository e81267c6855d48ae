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
    monkeypatch.setattr(device, "_matvec_seconds", lambda dtype, d_model: 1e-4)
    assert device.pick_dtype("auto", "cpu") == torch.bfloat16
    times[torch.bfloat16] = 0.9e-3  # not 1.3x faster: keep float32
    assert device.pick_dtype("auto", "cpu") == torch.float32
    times.update({torch.float32: 1e-4, torch.bfloat16: 0.3e-4})  # faster, but too small a matmul to matter
    assert device.pick_dtype("auto", "cpu") == torch.float32


def test_this_machines_flags_are_read() -> None:
    flags = device.cpu_flags()
    assert not flags or "fpu" in flags or "sse2" in flags


@pytest.mark.parametrize(("fp32_us", "bf16_us", "dtype", "words"), [
    (196, 106, torch.float32, ["1.85x faster", "too small", "per-op overhead"]),  # faster, but a tiny matmul
    (1000, 900, torch.float32, ["not 1.3x faster", "1.11x"]),
    (1000, 500, torch.bfloat16, ["2.00x faster", "big enough"]),
])
def test_the_choice_says_why(fp32_us: float, bf16_us: float, dtype: torch.dtype, words: list[str]) -> None:
    choice, reason = device.cpu_dtype_choice(fp32_us * 1e-6, bf16_us * 1e-6)
    assert choice == dtype and all(w in reason for w in words), reason


def test_the_start_up_line_gives_the_reason(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(device, "cpu_flags", lambda: {"avx512f", "avx512_bf16"})
    times = {torch.float32: 196e-6, torch.bfloat16: 106e-6}
    monkeypatch.setattr(device, "_matmul_seconds", lambda dtype, d_model: times[dtype])
    monkeypatch.setattr(device, "_matvec_seconds", lambda dtype, d_model: 1e-4)
    with caplog.at_level("INFO", logger="attnserve.device"):
        assert device.pick_dtype("auto", "cpu") == torch.float32
    line = caplog.records[-1].getMessage()
    assert line.startswith("dtype auto: float32: bfloat16 is 1.85x faster") and "too small" in line, line
    assert "196 us in float32, 106 us in bfloat16" in line
    monkeypatch.setattr(device, "cpu_flags", lambda: {"avx2"})
    with caplog.at_level("INFO", logger="attnserve.device"):
        assert device.pick_dtype("auto", "cpu") == torch.float32
    assert "no native bfloat16 instructions" in caplog.records[-1].getMessage()


def test_a_slower_matvec_keeps_float32(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """bf16 twice as fast on the 32-row matmul but 1.5x slower on the one-row matvec: one stream would lose."""
    monkeypatch.setattr(device, "cpu_flags", lambda: {"avx512f", "avx512_bf16"})
    monkeypatch.setattr(device, "_matmul_seconds", lambda dtype, d_model: {torch.float32: 2e-3}.get(dtype, 1e-3))
    monkeypatch.setattr(device, "_matvec_seconds", lambda dtype, d_model: {torch.float32: 2e-4}.get(dtype, 3e-4))
    with caplog.at_level("INFO", logger="attnserve.device"):
        assert device.pick_dtype("auto", "cpu") == torch.float32
    line = caplog.records[-1].getMessage()
    assert "1.50x slower on the one-stream matvec" in line and "200 us" in line and "300 us" in line, line


def test_the_matvec_is_timed_from_memory() -> None:
    """The real timing runs and gives a plausible time (a 64 x 256 float32 matvec, cycled past the cache)."""
    assert 0 < device._matvec_seconds(torch.float32, 64, reps=1) < 0.1

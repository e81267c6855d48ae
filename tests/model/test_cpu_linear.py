"""The decode matvec kernel (model/csrc/matvec.cpp) against torch's matmul on the same bfloat16-rounded operands
(float32 ones for the float32 kernel), and the packed layers that serving puts in place of float32, bfloat16 and
int8 linears (model/cpu_linear.py). They run on whichever build this CPU has, AVX-512 BF16 or AVX2 + FMA.

Shapes cover what a panel layout gets wrong: rows of W not a multiple of the 32-row work item, an odd number of
input features, rows of x not a multiple of the 8-row tile, up to the layers' row limit and past it."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from types import ModuleType

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from model import cpu_kernels, cpu_linear
from model.config import preset
from model.cpu_linear import (
    MAX_ROWS,
    FusedRMSNorm,
    PackedBlockInt8Linear,
    PackedInt8Linear,
    PackedLinear,
    can_fuse_norm,
    pack,
    pack_block_scales,
    pack_f32,
    pack_quads,
)
from model.quantize import (
    BlockInt8Linear,
    Int8Linear,
    dequantize,
    dequantize_blocks,
    int8_kernel,
    quantize_weight,
)
from model.transformer import build_model
from service.engine.weights import prepare


@pytest.fixture(scope="module")
def kernel() -> ModuleType:
    module = cpu_linear.kernel()
    if module is None:
        pytest.skip(f"no matvec kernel here: {cpu_kernels.why_not('matvec') or 'neither AVX-512 BF16 nor AVX2 + FMA'}")
    return module


def _rows(v: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    return F.pad(v.float(), (0, packed.size(0) * packed.size(2) - v.numel()))


@pytest.mark.parametrize("m", [1, 5, 8, 9, 33])
@pytest.mark.parametrize(("k", "n"), [(64, 96), (101, 37), (576, 960)])
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
def test_kernel_equals_matmul_on_bfloat16_operands(kernel: ModuleType, m: int, k: int, n: int,
                                                   x_dtype: torch.dtype) -> None:
    torch.manual_seed(m * 1000 + k)
    x, w, b = torch.randn(m, k, dtype=x_dtype), torch.randn(n, k) / k**0.5, torch.randn(n)
    xr, wb = x.bfloat16().double(), w.bfloat16()
    packed = pack(wb)
    assert packed.shape == (-(-n // 32) * 2, (k + 1) // 2, 16, 2)
    y = kernel.linear(x, packed, n, None, _rows(b, packed))
    assert y.dtype == x_dtype and y.shape == (m, n)
    ref = xr @ wb.double().T + b.double()
    tol = 1e-5 if x_dtype == torch.float32 else 1e-2  # float32 sums either way; bfloat16 output rounds them
    torch.testing.assert_close(y.double(), ref, rtol=tol, atol=tol * float(ref.abs().max()))
    q, scale = quantize_weight(w)
    yq = kernel.linear(x, pack(q), n, _rows(scale, packed), None)
    refq = xr @ dequantize(q, scale).double().T
    torch.testing.assert_close(yq.double(), refq, rtol=tol, atol=tol * float(refq.abs().max()))


@pytest.mark.parametrize("m", [1, 3, 4, 9, 64])
@pytest.mark.parametrize(("k", "n"), [(64, 96), (576, 37)])
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
def test_q8_kernel_equals_its_quantized_product(kernel: ModuleType, m: int, k: int, n: int,
                                                  x_dtype: torch.dtype) -> None:
    """The int8 x int8 product (AVX-512 VNNI, or AVX2): x quantized in blocks of 32 (symmetric, round to nearest), int32 sums per block
    scaled back, times each row's scale; the same arithmetic in float64 here, and within int8's error of x @ W^T."""
    if not kernel.has_q8():
        pytest.skip("this build has no int8 x int8 product")
    torch.manual_seed(m * 100 + k)
    x, w, b = torch.randn(m, k, dtype=x_dtype) * 2, torch.randn(n, k) / k**0.5, torch.randn(n)
    q, scale = quantize_weight(w)
    packed = pack_quads(q)
    assert packed.shape == (-(-n // 32), k // 4, 32, 4)  # per item of 32 rows: each quad of features, then its rows
    assert int(packed[0, 1, 2, 3]) == (int(q[2, 7]) + kernel.quad_offset) & 0xFF
    y = kernel.linear_q8(x, packed, n, _rows(scale, packed), _rows(b, packed))
    assert y.dtype == x_dtype and y.shape == (m, n)
    blocks = x.double().view(m, k // 32, 32)
    s = blocks.abs().amax(-1, keepdim=True).float().double() / 127
    xq = torch.where(s > 0, torch.round(blocks / s), torch.zeros_like(blocks))
    ref = ((xq * s).view(m, k) @ q.double().T) * scale.double() + b.double()
    tol = 1e-5 if x_dtype == torch.float32 else 1e-2
    torch.testing.assert_close(y.double(), ref, rtol=tol, atol=tol * float(ref.abs().max()))
    exact = x.double() @ dequantize(q, scale).double().T + b.double()
    assert float((y.double() - exact).abs().max()) <= 0.02 * float(exact.abs().max())


@pytest.mark.parametrize("m", [1, 2, 3, 9, MAX_ROWS + 3])
@pytest.mark.parametrize(("k", "n"), [(64, 96), (576, 37)])
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
def test_q8_block_kernel_equals_its_quantized_product(kernel: ModuleType, m: int, k: int, n: int,
                                                      x_dtype: torch.dtype) -> None:
    """Q8_0's form (a float16 scale per 32 features of each row): x quantized in blocks of 32 as above, each block's
    int32 sum scaled by x's and the weight's block scales; in float64 here. The packed layer equals the kernel and
    stays within int8's error of the plain layer's dequantized product, at any number of rows."""
    if not kernel.has_q8_blocks():
        pytest.skip("this build has no block scales")
    torch.manual_seed(m * 10 + k)
    x, w, b = torch.randn(m, k, dtype=x_dtype) * 2, torch.randn(n, k) / k**0.5, torch.randn(n)
    w[0, 3] = 1.5  # an outlier: only its block's scale grows
    linear = nn.Linear(k, n)
    linear.weight.data, linear.bias.data = w, b
    plain = BlockInt8Linear.of(linear)
    q, scale = plain.qweight, plain.scale
    assert scale.dtype == torch.float16 and scale.shape == (n, k // 32)
    y = kernel.linear_q8_blocks(x, pack_quads(q), n, pack_block_scales(scale), _rows(b, pack_quads(q)))
    assert y.dtype == x_dtype and y.shape == (m, n)
    blocks = x.double().view(m, k // 32, 32)
    s = blocks.abs().amax(-1, keepdim=True).float().double() / 127
    xq = torch.where(s > 0, torch.round(blocks / s), torch.zeros_like(blocks))
    sums = torch.einsum("mbj,nbj->mnb", xq, q.double().view(n, k // 32, 32))
    ref = (sums * s.view(m, 1, -1) * scale.double()[None]).sum(-1) + b.double()
    tol = 1e-5 if x_dtype == torch.float32 else 1e-2
    torch.testing.assert_close(y.double(), ref, rtol=tol, atol=tol * float(ref.abs().max()))
    exact = x.double() @ dequantize_blocks(q, scale).double().T + b.double()
    assert float((y.double() - exact).abs().max()) <= 0.02 * float(exact.abs().max())
    assert float((dequantize_blocks(q, scale) - w).abs().max()) <= 0.01  # the outlier's block only
    torch.testing.assert_close(PackedBlockInt8Linear(plain)(x), y, rtol=0, atol=0)
    torch.testing.assert_close(plain(x).double(), exact, rtol=tol, atol=tol * float(exact.abs().max()))


@pytest.mark.parametrize("m", [1, 2, 3, 8, 9, 33, MAX_ROWS])
@pytest.mark.parametrize(("k", "n"), [(64, 96), (101, 37), (576, 960)])
def test_float32_kernel_equals_matmul(kernel: ModuleType, m: int, k: int, n: int) -> None:
    torch.manual_seed(m * 1000 + k + 7)
    x, w, b = torch.randn(m, k), torch.randn(n, k) / k**0.5, torch.randn(n)
    packed = pack_f32(w)
    assert packed.shape == (-(-n // 32) * 2, k, 16)
    y = kernel.linear_f32(x, packed, n, _rows(b, packed))
    assert y.dtype == torch.float32 and y.shape == (m, n)
    ref = x.double() @ w.double().T + b.double()
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))
    torch.testing.assert_close(kernel.linear_f32(x, packed, n, None), F.linear(x, w), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows", [8, 13, 40])  # from 8 rows AVX2 runs tiles of up to 4 / 6 rows (matvec_avx2_rows.h)
def test_a_row_is_the_same_alone_and_batched(kernel: ModuleType, rows: int) -> None:
    torch.manual_seed(0)
    x, w = torch.randn(rows, 200, dtype=torch.bfloat16), torch.randn(70, 200, dtype=torch.bfloat16)
    packed, packed32 = pack(w), pack_f32(w.float())
    q, scale = quantize_weight(w.float())
    packed8, scales = pack(q), _rows(scale, packed)
    batched = kernel.linear(x, packed, 70, None, None)
    batched8 = kernel.linear(x, packed8, 70, scales, None)
    batched32 = kernel.linear_f32(x.float(), packed32, 70, None)
    for i in sorted({0, 1, 7, rows // 2, rows - 3}):
        assert torch.equal(kernel.linear(x[i:i + 1], packed, 70, None, None)[0], batched[i])
        assert torch.equal(kernel.linear(x[i:i + 1], packed8, 70, scales, None)[0], batched8[i])
        assert torch.equal(kernel.linear_f32(x[i:i + 1].float(), packed32, 70, None)[0], batched32[i])
        assert torch.equal(kernel.linear_f32(x[i:i + 3].float(), packed32, 70, None)[0], batched32[i])


def test_kernel_refuses_what_does_not_fit(kernel: ModuleType) -> None:
    w = pack(torch.randn(32, 64, dtype=torch.bfloat16))
    with pytest.raises(RuntimeError, match="features"):
        kernel.linear(torch.randn(1, 62), w, 32, None, None)
    with pytest.raises(RuntimeError, match="scales"):
        kernel.linear(torch.randn(1, 64), w, 32, torch.ones(32), None)
    with pytest.raises(RuntimeError, match="padded"):
        kernel.linear(torch.randn(1, 64), w, 32, None, torch.ones(31))


@pytest.mark.parametrize("rows", [1, 17, MAX_ROWS, MAX_ROWS + 1])
def test_packed_layers_equal_the_layers_they_replace(kernel: ModuleType, rows: int) -> None:
    torch.manual_seed(rows)
    linear = nn.Linear(96, 80).to(torch.bfloat16)
    x = torch.randn(2, rows, 96, dtype=torch.bfloat16)
    linear32, x32 = nn.Linear(97, 80), torch.randn(2, rows, 97)
    with torch.inference_mode():
        torch.testing.assert_close(PackedLinear(linear32)(x32), linear32(x32), rtol=1e-5, atol=1e-5)
        packed = PackedLinear(linear)
        ref = linear(x).float()
        torch.testing.assert_close(packed(x).float(), ref, rtol=2e-2, atol=2e-2 * float(ref.abs().max()))
        int8 = Int8Linear.of(linear)
        with int8_kernel("dequantize"):
            ref8 = int8(x).float()
        got8 = PackedInt8Linear(int8)(x).float()
        torch.testing.assert_close(got8, ref8, rtol=2e-2, atol=2e-2 * float(ref8.abs().max()))
    assert sum(p.numel() for p in packed.parameters()) == sum(p.numel() for p in linear.parameters())


def test_serving_packs_bfloat16_and_int8_linears_and_the_logits_stay(kernel: ModuleType) -> None:
    torch.manual_seed(0)
    model = build_model(preset("tiny-llama", vocab_size=80, max_len=64)).eval()
    ids, pos = torch.randint(0, 80, (1, 12)), torch.arange(12)[None]
    with torch.inference_mode():
        for quantization in ("none", "int8"):
            plain, served = (copy.deepcopy(model).to(torch.bfloat16) for _ in range(2))
            prepare(plain, quantization, prepack=False)
            prepare(served, quantization)
            layer = served.decoder.layers[0]
            kind = PackedLinear if quantization == "none" else PackedInt8Linear
            assert isinstance(layer.self_attn.w_qkv, kind) and isinstance(layer.ffn.w_2, kind)
            blocks = quantization == "int8" and kernel.has_q8_blocks()  # else the head stays bfloat16 under int8
            assert isinstance(served.generator, PackedBlockInt8Linear if blocks else PackedLinear)
            if cpu_kernels.load("rms_norm") is not None:
                assert isinstance(layer.res_ffn.norm, FusedRMSNorm) and isinstance(served.decoder.norm, FusedRMSNorm)
            ref = plain.logits(plain.decode(ids, pos)).float()
            got = served.logits(served.decode(ids, pos)).float()
            assert float((got - ref).abs().max()) <= 0.03 * float(ref.abs().max()), quantization


def test_turned_off_the_kernel_leaves_onednn_in_place() -> None:
    code = ("import torch; from torch import nn; from model import cpu_linear, cpu_kernels; "
            "print(cpu_linear.kernel() is None, cpu_linear.can_pack(nn.Linear(8, 8).bfloat16()), "
            "cpu_kernels.why_not('matvec'))")
    env = {**os.environ, "ATTNSERVE_MATVEC_KERNEL": "0"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True False turned off by ATTNSERVE_MATVEC_KERNEL=0"


@pytest.mark.parametrize("rows", [1, 7, 300])
@pytest.mark.parametrize("d", [576, 40, 100])
def test_fused_rms_norm_equals_torch_to_the_last_bfloat16_bit(rows: int, d: int) -> None:
    norm = nn.RMSNorm(d, eps=1e-5).to(torch.bfloat16)
    if not can_fuse_norm(norm):
        pytest.skip(f"no norm kernel here: {cpu_kernels.why_not('rms_norm')}")
    torch.manual_seed(rows + d)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(d))
    x = (torch.randn(2, rows, d) * 3).bfloat16()
    with torch.inference_mode():
        ref, got = norm(x), FusedRMSNorm(norm)(x)
    assert got.dtype == torch.bfloat16 and got.shape == x.shape
    ulp = ref.float().abs().clamp(min=1e-30) * 2.0**-7  # bfloat16 keeps 8 significant bits
    assert bool(((got.float() - ref.float()).abs() <= ulp).all())
    assert float((got != ref).float().mean()) < 0.01  # the sum's order moves a rare last bit, no more
    assert not can_fuse_norm(nn.RMSNorm(d))  # float32 keeps torch's: its outputs stay equal to the reference's


def test_a_packed_layer_can_be_moved_again(kernel: ModuleType) -> None:
    """`.to()` recasts the plain weights and packs them anew: a packed layer then equals F.linear in the new dtype
    (float32 falls back to it), and packs again on the way back to bfloat16."""
    torch.manual_seed(0)
    linear = nn.Linear(64, 48).to(torch.bfloat16)
    packed = PackedLinear(linear).to(torch.float32)
    x = torch.randn(3, 64)
    with torch.inference_mode():
        torch.testing.assert_close(packed(x), F.linear(x, packed.weight, packed.bias))
        packed = packed.to(torch.bfloat16)
        assert packed.packed.dtype == torch.bfloat16 and packed.bias_rows is not None
        ref = F.linear(x.bfloat16(), packed.weight, packed.bias).float()
        torch.testing.assert_close(packed(x.bfloat16()).float(), ref, rtol=2e-2, atol=2e-2 * float(ref.abs().max()))
        int8 = PackedInt8Linear(Int8Linear.of(linear)).to(torch.float32)  # scales stay float32 for the kernel
        assert int8.scale_rows.dtype == torch.float32
        ref8 = F.linear(x, int8.weight, int8.bias.float() if int8.bias is not None else None)
        torch.testing.assert_close(int8(x), ref8, rtol=2e-2, atol=2e-2 * float(ref8.abs().max()))

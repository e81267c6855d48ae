"""Linear layers for a CPU decode step: the weight packed once in panels of 16 rows and multiplied by
model/csrc/matvec.cpp, which reads it from memory once per call whatever the number of rows. Two builds of the
kernel, by the CPU it is built on: AVX-512 BF16 (the packed layout is the operand layout of its pair dot product)
and AVX2 + FMA (csrc/matvec_avx2.h: the same layout and arithmetic in 8-lane registers); `kernel().isa()` says
which. Elsewhere `kernel()` is None and the linears stay on oneDNN / torch.

At one stream every weight is read once per token, so a decode step is as fast as its matrix-vector products read
memory. Measured with SmolLM2-135M's shapes, two threads (benchmarks/matvec.py), on AVX-512 BF16: at one row the
kernel reads a bfloat16 weight at 1.5-2x oneDNN's prepacked rate (~30-45 GB/s against ~15-30), and at 8-64 rows it
is about as fast (0.85-1.3x: both compute-bound); int8 (below) runs 1.5-2.3x torch's int8 weight-only kernel at one
row and 3-5x from 8 rows up. On AVX2 + FMA (a 2-core Zen 3, where oneDNN packs no bfloat16 weight): float32 at
1.3-1.5x oneDNN's prepacked float32 rate at one row (~27-36 GB/s), 1.2-1.4x at 8 rows, about even at 32;
bfloat16 in 0.45-0.65x our float32's time at one row, int8 in 0.3-0.4x. Above `MAX_ROWS` rows (prefill chunks)
the plain paths take over: `F.linear` for bfloat16, the dequantized weight for int8 (model/quantize.py); but the
int8 x int8 product keeps them too, being compute-bound there at more MACs per instruction than float32 FMAs: on the
2-core Zen 3 (AVX2) at 65-512 rows it took 0.4-0.8x the time of dequantizing + F.linear (SmolLM2's shapes), and on a
2-core AVX-512 VNNI EPYC 0.13-0.3x (240 GMAC/s at 512 rows against 77). So does the bfloat16 kernel: on AVX2
F.linear in bfloat16 has no native path and took ~7x its time at 65-512 rows; on that AVX-512 EPYC it runs as fast as
oneDNN's GEMM (174-200 GMAC/s at 128-512 rows against 176-198), and its float32 as MKL's (90-100 each), so there
float32 keeps the kernel too (`takes_any_rows`).

Packed layout, rows in panels of 16: packed[panel][k / 2][row][2] = W[panel * 16 + row][k], padded with zero rows
to a whole number of work items (2 panels) and a zero column to an even K; scales and bias padded alike, float32.
bfloat16 weights, and int8 ones (widened in registers; on AVX2 converted to float32). x is rounded to bfloat16 on
both builds; sums are float32. A float32 weight is packed as packed[panel][k][row] and multiplied in float32
throughout (csrc/matvec_f32.h, csrc/matvec_avx2.h): on AVX-512 1.3-2.3x oneDNN's prepacked rate at 1 and 8 rows
(26-34 GB/s at one), 1.0-1.2x at 32. Where K is a multiple of 32, an int8 weight is packed as q + 128 in quads of
features instead and multiplied by x quantized to int8 in blocks of 32 with a scale each (llama.cpp's Q8_0 x Q8
product; `has_q8()`): with AVX-512 VNNI's vpdpbusd (csrc/matvec_vnni.h) 10-30% faster than widening the weight to
bfloat16; on AVX2 with vpmaddubsw (csrc/matvec_q8_avx2.h) 1.1-1.2x the widened kernel at one row and 1.6-1.9x at 8
and 32 (float32 conversions of every weight, redone per 2 rows of x, had bound it). SmolLM2's perplexity +0.94-0.98%
over float32 against +0.63% with x in bfloat16 (benchmarks/precision.py; the limit is 1%).

`FusedRMSNorm` is a bfloat16 model's RMSNorm in one C++ pass (model/csrc/rms_norm.cpp): torch's runs as ~10 small
ops, ~15 us a row against ~2 us, 61 times in a 30-layer step. The same arithmetic in float32, rounded once; the sum
of squares in another order, so an output may differ from torch's in its last bfloat16 bit. A float32 model keeps
torch's (its outputs stay equal to the reference's)."""

from __future__ import annotations

from types import ModuleType

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model import cpu_kernels
from model.quantize import BlockInt8Linear, Int8Linear, int8_kernel_choice

MAX_ROWS = 64  # up to this many rows the kernel was at least as fast as oneDNN / torch (benchmarks/matvec.py)
Q8_BLOCK = 32  # features per scale of x in the int8 x int8 product


def kernel() -> ModuleType | None:
    """The matvec kernel where it is built and this CPU has AVX-512 BF16 or AVX2 + FMA (`isa()` says which), else
    None. Either build takes every dtype `can_pack` accepts: bfloat16, float32 and int8."""
    module = cpu_kernels.load("matvec")
    return module if module is not None and module.available() else None


def pack(w: Tensor, panel: int = 16, panels: int = 2) -> Tensor:
    """(N, K) -> (rows / panel, ceil(K / 2), panel, 2), rows = N rounded up to panel * panels."""
    n, k = w.shape
    rows = -(-n // (panel * panels)) * panel * panels
    padded = F.pad(w.detach(), (0, k % 2, 0, rows - n))
    return padded.view(rows // panel, panel, (k + 1) // 2, 2).permute(0, 2, 1, 3).contiguous()


def pack_quads(q: Tensor, panel: int = 16, panels: int = 2) -> Tensor:
    """int8 (N, K), K a multiple of 4 -> uint8 (rows / item, K / 4, item, 4), item = panel * panels rows (a work
    item's): for each quad of input features, the item's rows' four values side by side, so an item is one
    forward stream (its panels interleaved: SmolLM2's one-row int8 products read their weights ~10-30% faster than
    with each panel a stream of its own, where a panel is only ~9 KB; benchmarks/NOTES.md section 29). q + 128 for
    AVX-512 VNNI's unsigned operand or q itself for AVX2's (the build's `quad_offset`). q is clamped to +-127 (AVX2
    flips its sign; our quantizer and llama.cpp's Q8_0 never write -128), so both builds sum the same."""
    n, k = q.shape
    item = panel * panels
    rows = -(-n // item) * item
    module = kernel()
    offset = module.quad_offset if module is not None else 128
    quads = ((F.pad(q.detach(), (0, 0, 0, rows - n)).to(torch.int16).clamp(-127, 127) + offset) & 0xFF).to(torch.uint8)
    return quads.view(rows // item, item, k // 4, 4).permute(0, 2, 1, 3).contiguous()


def pack_block_scales(scale: Tensor, panel: int = 16, panels: int = 2) -> Tensor:
    """float16 (N, K / 32) block scales -> (rows / 32, K / 32, 32): per work item of 32 rows, per block, the rows'
    scales in order (what `linear_q8_blocks` reads beside pack_quads' weight); padded rows get scale 0."""
    n, blocks = scale.shape
    item = panel * panels
    rows = -(-n // item) * item
    padded = F.pad(scale.detach().half(), (0, 0, 0, rows - n))
    return padded.view(rows // item, item, blocks).transpose(1, 2).contiguous()


def pack_f32(w: Tensor, panel: int = 16, panels: int = 2) -> Tensor:
    """float32 (N, K) -> (rows / panel, K, panel), rows = N rounded up to panel * panels."""
    n, k = w.shape
    rows = -(-n // (panel * panels)) * panel * panels
    return F.pad(w.detach(), (0, 0, 0, rows - n)).view(rows // panel, panel, k).transpose(1, 2).contiguous()


def _padded(v: Tensor | None, rows: int) -> Tensor | None:
    return None if v is None else F.pad(v.detach().float(), (0, rows - v.numel())).contiguous()


def can_pack(linear: nn.Module) -> bool:
    """Whether `linear` can run on the kernel: a bfloat16 or float32 nn.Linear or an int8 one, on a CPU that has
    it."""
    if type(linear) is nn.Linear:
        ok = linear.weight.dtype in (torch.bfloat16, torch.float32) and linear.weight.device.type == "cpu"
    elif type(linear) is BlockInt8Linear:
        module = kernel()
        return bool(module is not None and module.has_q8_blocks() and linear.qweight.device.type == "cpu"
                    and linear.in_features % Q8_BLOCK == 0)
    else:
        ok = type(linear) is Int8Linear and linear.qweight.device.type == "cpu"
    return ok and kernel() is not None


def takes_any_rows(linear: nn.Module) -> bool:
    """Whether the kernel multiplies this packed linear at least as fast as oneDNN / MKL at any number of rows (a
    prefill's hundreds, not only decode's few): the int8 x int8 product and the bfloat16 one everywhere (module
    docstring), the float32 one where the kernel is AVX-512's (2-core EPYC, SmolLM2's shapes at 128-512 rows: 90-100
    GMAC/s, as MKL's sgemm; AVX2's was not measured there, so it keeps MAX_ROWS)."""
    module = kernel()
    if module is None:
        return False
    if isinstance(linear, PackedInt8Linear | PackedBlockInt8Linear):
        return isinstance(linear, PackedBlockInt8Linear) or linear.q8
    if isinstance(linear, PackedLinear):
        return linear.weight.dtype == torch.bfloat16 or module.isa() == "avx512bf16"
    return False


class Repacked(nn.Module):
    """A layer that keeps packed copies made from its weights (non-persistent buffers): `.to()` and friends move
    the plain weights, then `_pack` remakes the copies from them; so does assigning a new weight or bias."""

    def _pack(self) -> None:
        raise NotImplementedError

    def __setattr__(self, name: str, value: Tensor | nn.Module) -> None:
        super().__setattr__(name, value)
        if name in ("weight", "bias", "qweight", "scale") and "packed" in self._buffers:
            self._pack()

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        self._pack()
        return self


class PackedLinear(Repacked):
    """y = x W^T + b with a bfloat16 or float32 W: the kernel up to MAX_ROWS rows (at any where `takes_any_rows`),
    F.linear above. `weight` keeps the plain weight (what readers of W and the parameter count see); the packed copy
    is a buffer beside it."""

    packed: Tensor
    bias_rows: Tensor | None

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self._pack()

    def _pack(self) -> None:
        packed = pack_f32(self.weight) if self.weight.dtype == torch.float32 else pack(self.weight)
        self.register_buffer("packed", packed, persistent=False)
        self.register_buffer("bias_rows", _padded(self.bias, packed.size(0) * packed.size(2)), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        x2 = x.reshape(-1, self.in_features)
        module, dtype = kernel(), self.weight.dtype
        many = x2.size(0) > MAX_ROWS and not takes_any_rows(self)
        if many or module is None or dtype not in (torch.bfloat16, torch.float32) or (
                dtype == torch.float32 and x.dtype != dtype):
            bias = self.bias.detach() if self.bias is not None else None
            return F.linear(x.to(dtype), self.weight.detach(), bias).to(x.dtype)  # y in x's dtype, as the kernel's
        if dtype == torch.float32:
            y = module.linear_f32(x2, self.packed, self.out_features, self.bias_rows)
        else:
            y = module.linear(x2, self.packed, self.out_features, None, self.bias_rows)
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, packed for the matvec kernel"


class PackedInt8Linear(Repacked, Int8Linear):
    """An Int8Linear whose products run on the kernel (its int8 weight packed beside the plain one): the int8 x int8
    product at any number of rows, the others up to MAX_ROWS; more rows take Int8Linear's own path.
    `model.quantize.int8_kernel("matvec")` forces the kernel at any row count, another forced path Int8Linear's (to
    measure each path's accuracy, benchmarks/precision.py)."""

    packed: Tensor
    scale_rows: Tensor
    bias_rows: Tensor | None
    q8: bool
    any_rows: bool

    def __init__(self, linear: Int8Linear) -> None:
        super().__init__(linear.qweight.detach(), linear.scale, linear.bias)
        self._pack()

    def _pack(self) -> None:
        module = kernel()
        self.q8 = bool(module is not None and module.has_q8() and self.in_features % Q8_BLOCK == 0)
        self.any_rows = self.q8  # the int8 x int8 product at any number of rows (the module docstring)
        packed = pack_quads(self.qweight) if self.q8 else pack(self.qweight)
        rows = packed.size(0) * packed.size(2)
        self.register_buffer("packed", packed, persistent=False)
        self.register_buffer("scale_rows", _padded(self.scale, rows), persistent=False)
        self.register_buffer("bias_rows", _padded(self.bias, rows), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        x2 = x.reshape(-1, self.in_features)
        module, choice = kernel(), int8_kernel_choice()
        rows_ok = self.any_rows or x2.size(0) <= MAX_ROWS
        if module is None or not (choice == "matvec" or (choice == "auto" and rows_ok)):
            return super().forward(x)
        if self.q8:
            y = module.linear_q8(x2, self.packed, self.out_features, self.scale_rows, self.bias_rows)
        else:
            y = module.linear(x2, self.packed, self.out_features, self.scale_rows, self.bias_rows)
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return super().extra_repr() + ", packed for the matvec kernel"


class PackedBlockInt8Linear(Repacked, BlockInt8Linear):
    """A BlockInt8Linear multiplied by the kernel's int8 x int8 product with its block scales (`linear_q8_blocks`),
    at any number of rows: dequantizing a vocab-sized head for a prefill's rows would cost more than the product.
    Where the kernel lacks block scales, or another int8 path is forced, BlockInt8Linear's own product runs."""

    packed: Tensor
    block_scales: Tensor
    bias_rows: Tensor | None

    def __init__(self, linear: BlockInt8Linear) -> None:
        super().__init__(linear.qweight.detach(), linear.scale, linear.bias)
        self._pack()

    def _pack(self) -> None:
        packed = pack_quads(self.qweight)
        self.register_buffer("packed", packed, persistent=False)
        self.register_buffer("block_scales", pack_block_scales(self.scale), persistent=False)
        self.register_buffer("bias_rows", _padded(self.bias, packed.size(0) * packed.size(2)), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        module = kernel()
        if module is None or not module.has_q8_blocks() or int8_kernel_choice() not in ("auto", "matvec"):
            return super().forward(x)
        y = module.linear_q8_blocks(x.reshape(-1, self.in_features), self.packed, self.out_features,
                                    self.block_scales, self.bias_rows)
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return super().extra_repr() + ", packed for the matvec kernel"


def can_fuse_norm(norm: nn.Module) -> bool:
    """Whether `norm` is a bfloat16 nn.RMSNorm (with a weight) on a CPU where the norm kernel is built."""
    return (type(norm) is nn.RMSNorm and isinstance(norm.weight, Tensor) and norm.weight.dtype == torch.bfloat16
            and norm.weight.device.type == "cpu" and cpu_kernels.load("rms_norm") is not None)


class FusedRMSNorm(nn.Module):
    """nn.RMSNorm's y = x / sqrt(mean(x^2) + eps) * g for bfloat16 x, in one kernel call; the same weight."""

    def __init__(self, norm: nn.RMSNorm) -> None:
        super().__init__()
        self.weight = norm.weight
        self.normalized_shape = norm.normalized_shape
        self.eps = norm.eps if norm.eps is not None else torch.finfo(torch.bfloat16).eps

    def forward(self, x: Tensor) -> Tensor:
        module = cpu_kernels.load("rms_norm")
        if module is None or x.dtype != self.weight.dtype or x.dtype != torch.bfloat16:
            return F.rms_norm(x, self.normalized_shape, self.weight, self.eps)
        return module.rms_norm(x, self.weight.detach(), self.eps)

    def extra_repr(self) -> str:
        return f"{tuple(self.normalized_shape)}, eps={self.eps}, one kernel call"

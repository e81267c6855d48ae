"""Weight-only int8 for serving: each output channel (row) of a linear's weight as int8 times one scale.

W[n, :] ~= q[n, :] * s[n], s[n] = max|W[n, :]| / 127, q = round(W / s) in [-127, 127] (symmetric, no zero point).
Activations stay in the model's precision; a matvec reads a quarter of float32's bytes, which is what bounds a
CPU decode step at few streams. The scale is rounded to a bfloat16 value before q is computed, so the kernel
that takes bfloat16 scales (below) multiplies by exactly the scale q was made with.

The matmul (`int8_matmul`), chosen by benchmarks/matvec.py's measurements:
- few rows on a CPU: `torch.ops.aten._weight_int8pack_mm`, whose AVX-512/AVX2 kernel converts each int8 weight
  to float in registers (bfloat16 activations in, bfloat16 out; its float32 path is a scalar loop, far slower);
- more rows (prefill chunks), or another device: the weight dequantized to the activations' dtype, then
  `F.linear`. The kernel above re-reads the weight for every 4 rows and slows with rows (measured on SmolLM2's
  shapes: 2-3x a float32 oneDNN matmul's time at 8-32 rows), but up to 32 rows it still beat dequantizing.
  So int8 pays at one to a few streams; at many streams float is faster (benchmarks/matvec.py).
Where the CPU has AVX-512 BF16 or AVX2 + FMA, serving replaces both for up to 64 rows by model/cpu_linear.py's
kernel, which reads the int8 weight once per call whatever the rows (`PackedInt8Linear`, made by
service/engine/weights.py).

`BlockInt8Linear` is the finer form, llama.cpp's Q8_0: a float16 scale per block of 32 input features of each
row, so one outlier costs the precision of 32 weights, not of a whole row. Serving uses it for the LM head, whose
per-row form cost SmolLM2 ~0.3% perplexity (service/engine/weights.py), where the kernel multiplies it in place
(model/cpu_linear.py's `PackedBlockInt8Linear`).

Per-output-channel rows stack: quantizing a fused W_QKV equals stacking the quantized W_Q, W_K, W_V, so
quantization and fusion (model/fusion.py) commute."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

BLOCK = 32  # input features per scale in the block form (llama.cpp's Q8_0)
PACK_MAX_ROWS = 32  # up to this many rows the int8 kernel beat dequantize + F.linear (benchmarks/matvec.py)
QMAX = 127


def quantize_weight(w: Tensor) -> tuple[Tensor, Tensor]:
    """(q int8 (N, K), scale float32 (N,)) with w ~= q * scale[:, None]; the scales are bfloat16-exact."""
    w = w.detach().float()
    amax = w.abs().amax(dim=1).clamp(min=1e-12)
    scale = (amax / QMAX).bfloat16().float()  # bf16-exact; a scale rounded down may clip |q| by < 0.5%
    q = torch.round(w / scale[:, None]).clamp(-QMAX, QMAX).to(torch.int8)
    return q, scale


def dequantize(q: Tensor, scale: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    return q.to(dtype) * scale[:, None].to(dtype)


def quantize_blocks(w: Tensor, block: int = BLOCK) -> tuple[Tensor, Tensor]:
    """(q int8 (N, K), scale float16 (N, K / block)) with w[n, b * block + j] ~= q[n, b * block + j] * scale[n, b];
    K a multiple of `block`. The scales are float16 values (no smaller than its least subnormal)."""
    w = w.detach().float()
    n, k = w.shape
    blocks = w.reshape(n, k // block, block)
    scale = (blocks.abs().amax(dim=2) / QMAX).half().clamp(min=torch.finfo(torch.float16).smallest_normal / 1024)
    q = torch.round(blocks / scale.float()[..., None]).clamp(-QMAX, QMAX).to(torch.int8)
    return q.reshape(n, k), scale


def dequantize_blocks(q: Tensor, scale: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    n, k = q.shape
    return (q.reshape(n, scale.size(1), -1).float() * scale[..., None].float()).reshape(n, k).to(dtype)


CPU_INT8_KERNEL = torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
KERNELS = ("auto", "matvec", "packed", "dequantize")  # matvec: model/cpu_linear.py's kernel, where prepared
_kernel = ["auto"]


@contextmanager
def int8_kernel(name: str) -> Iterator[None]:
    """Force one int8 matmul path inside the block ("matvec", "packed" or "dequantize"; "auto" picks by rows): to measure
    each path's accuracy on whole sequences (benchmarks/precision.py, tests)."""
    if name not in KERNELS:
        raise ValueError(f"int8 kernel {name!r} is not one of {KERNELS}")
    before, _kernel[0] = _kernel[0], name
    try:
        yield
    finally:
        _kernel[0] = before


def int8_kernel_choice() -> str:
    """The int8 path forced by `int8_kernel` ("auto" when none is)."""
    return _kernel[0]


def _packed_kernel(x: Tensor) -> bool:
    """Whether to use `_weight_int8pack_mm`: few rows on a CPU that has its vectorized kernel."""
    if _kernel[0] != "auto":
        return _kernel[0] == "packed"
    return x.device.type == "cpu" and x.size(0) <= PACK_MAX_ROWS and CPU_INT8_KERNEL


def int8_matmul(x: Tensor, q: Tensor, scale: Tensor, scale_bf16: Tensor | None = None) -> Tensor:
    """x (..., K) @ (q * scale)^T -> (..., N) in x's dtype."""
    x2 = x.reshape(-1, x.size(-1))
    if _packed_kernel(x2):
        s = scale_bf16 if scale_bf16 is not None else scale.bfloat16()
        y = torch.ops.aten._weight_int8pack_mm(x2.to(torch.bfloat16).contiguous(), q, s).to(x.dtype)
    else:
        y = F.linear(x2, dequantize(q, scale, x.dtype))
    return y.reshape(*x.shape[:-1], q.size(0))


class Int8Linear(nn.Module):
    """A linear layer with a weight-only int8 weight (per output channel) and its bias in the model's dtype."""

    qweight: Tensor
    scale: Tensor
    scale_bf16: Tensor

    def __init__(self, q: Tensor, scale: Tensor, bias: Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = q.shape
        self.qweight = nn.Parameter(q.contiguous(), requires_grad=False)  # a parameter: counted as the weight
        self.register_buffer("scale", scale.float())
        self.register_buffer("scale_bf16", scale.bfloat16())
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False) if bias is not None else None

    @classmethod
    def of(cls, linear: nn.Linear) -> Int8Linear:
        """The int8 form of an nn.Linear."""
        q, scale = quantize_weight(linear.weight)
        return cls(q, scale, linear.bias)

    @property
    def weight(self) -> Tensor:
        """The dequantized weight (float32), for readers that want W itself (inspection, tests)."""
        return dequantize(self.qweight, self.scale)

    def forward(self, x: Tensor) -> Tensor:
        y = int8_matmul(x, self.qweight, self.scale, self.scale_bf16)
        return y + self.bias.to(y.dtype) if self.bias is not None else y

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-channel"


class BlockInt8Linear(nn.Module):
    """A linear layer with a weight-only int8 weight and a float16 scale per block of 32 input features of each row
    (llama.cpp's Q8_0), its bias in the model's dtype. Its own product dequantizes the weight; where the matvec
    kernel has block scales, model/cpu_linear.py's `PackedBlockInt8Linear` multiplies it in place."""

    qweight: Tensor
    scale: Tensor

    def __init__(self, q: Tensor, scale: Tensor, bias: Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = q.shape
        self.qweight = nn.Parameter(q.contiguous(), requires_grad=False)
        self.register_buffer("scale", scale.half().contiguous())
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False) if bias is not None else None

    @classmethod
    def of(cls, linear: nn.Linear) -> BlockInt8Linear:
        q, scale = quantize_blocks(linear.weight)
        return cls(q, scale, linear.bias)

    @property
    def weight(self) -> Tensor:
        """The dequantized weight (float32)."""
        return dequantize_blocks(self.qweight, self.scale)

    def forward(self, x: Tensor) -> Tensor:
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        return F.linear(x, dequantize_blocks(self.qweight, self.scale, x.dtype), bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 in blocks of {BLOCK}"


def quantize_int8(model: nn.Module, include_head: bool = False) -> int:
    """Replace every nn.Linear of the encoder/decoder stacks (and the LM head if `include_head`) by its int8 form,
    in place; returns how many were replaced. Run after the model is on its device and in its dtype."""
    stacks = [m for name in ("encoder", "decoder") if isinstance(m := getattr(model, name, None), nn.Module)]
    count = 0
    for stack in stacks:
        for parent in list(stack.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear):
                    setattr(parent, name, Int8Linear.of(child).to(child.weight.device))
                    count += 1
    head = getattr(model, "generator", None)
    if include_head and isinstance(head, nn.Linear):
        model.generator = Int8Linear.of(head).to(head.weight.device)
        count += 1
    return count

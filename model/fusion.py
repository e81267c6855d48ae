"""Fused projections for serving: several linear layers that read the same input as one matmul.

x W_Q^T, x W_K^T and x W_V^T are the rows of x [W_Q; W_K; W_V]^T: one matmul over the stacked weight reads x
once and makes one call instead of three, which matters at decode's one row per stream, where each call is a
matrix-vector product bound by reading its weight. The outputs are split after; they are the same numbers (each
output element is the same dot product) up to the kernel's summation order.

The parts keep working as before: their weights become views of the stacked rows (non-persistent buffers, so
the parameters are counted once, by the fused layer), so a reader of `w_q.weight` sees the same values and the
model holds one copy. Fuse after the model is on its device and in its dtype: a later `.to()` would copy the
parts apart from the fused weight (still correct, twice the memory)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from model.quantize import Int8Linear


def fuse_linears(*parts: nn.Module) -> nn.Module:
    """One linear layer whose output is the parts' outputs concatenated (in order) on the last dimension: an
    nn.Linear from nn.Linear parts, an Int8Linear (model/quantize.py) from int8 ones (rows stack with their
    scales)."""
    if all(isinstance(p, Int8Linear) for p in parts):
        int8 = [p for p in parts if isinstance(p, Int8Linear)]
        _check(int8)
        fused: nn.Module = Int8Linear(torch.cat([p.qweight for p in int8]), torch.cat([p.scale for p in int8]),
                                      _cat_bias(int8))
        names: tuple[str, ...] = ("qweight", "scale", "scale_bf16", "bias")
        rows = [p.out_features for p in int8]
    elif all(type(p) is nn.Linear for p in parts):
        linears = [p for p in parts if isinstance(p, nn.Linear)]
        _check(linears)
        fused = _fused_linear(linears)
        names = ("weight", "bias")
        rows = [p.out_features for p in linears]
    else:
        raise ValueError("fused linears must be of one kind (nn.Linear or Int8Linear)")
    for name in names:
        whole = getattr(fused, name)
        if whole is not None:
            for part, view in zip(parts, whole.split(rows), strict=True):
                _share(part, name, view)
    return fused


def _check(parts: list[nn.Linear] | list[Int8Linear]) -> None:
    first = parts[0]
    if any(p.in_features != first.in_features or (p.bias is None) != (first.bias is None) for p in parts):
        raise ValueError("fused linears must share their input size and whether they have a bias")


def _cat_bias(parts: list[nn.Linear] | list[Int8Linear]) -> Tensor | None:
    biases = [p.bias for p in parts]
    return torch.cat([b for b in biases if b is not None]).detach() if biases[0] is not None else None


def _fused_linear(parts: list[nn.Linear]) -> nn.Linear:
    first, bias = parts[0], _cat_bias(parts)
    fused = nn.Linear(first.in_features, sum(p.out_features for p in parts), bias=bias is not None,
                      device=first.weight.device, dtype=first.weight.dtype)
    with torch.no_grad():
        fused.weight.copy_(torch.cat([p.weight for p in parts]))
        if bias is not None:
            fused.bias.copy_(bias)
    fused.requires_grad_(first.weight.requires_grad)
    return fused


def _share(part: nn.Module, name: str, view: Tensor) -> None:
    """part.<name> becomes `view` (a non-persistent buffer) instead of a parameter of its own."""
    delattr(part, name)
    part.register_buffer(name, view.detach(), persistent=False)

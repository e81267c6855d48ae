"""A linear layer whose weight oneDNN has reordered once into its own blocked layout (CPU serving).

`F.linear` on a CPU reads a row-major weight; oneDNN's prepacked form (`torch.ops.mkldnn._reorder_linear_weight`,
what torch.compile's CPU backend uses for frozen linears) lays it out in the blocks its kernel reads, so a
matrix-vector product streams the weight from memory at about twice the rate: benchmarks/matvec.py measured
~20-29 GB/s for float32 and bfloat16 against F.linear's ~11-13 GB/s at one row, and it stays ahead at 4-32 rows.
The same products (float tolerance); float32 and bfloat16 only."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

PACKABLE = (torch.float32, torch.bfloat16)


def can_prepack(linear: nn.Module) -> bool:
    """Whether `linear` is a plain nn.Linear on a CPU in a dtype oneDNN packs, and this torch has oneDNN."""
    return (type(linear) is nn.Linear and linear.weight.device.type == "cpu" and linear.weight.dtype in PACKABLE
            and torch.backends.mkldnn.is_available())


class PrepackedLinear(nn.Module):
    """y = x W^T + b through oneDNN with W prepacked. `weight` keeps the plain weight (what readers of W and the
    parameter count see; the packed copy is a buffer beside it)."""

    packed: Tensor | None

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self._pack()

    def _pack(self) -> None:
        """(Re)make the packed copy from `weight`; none where oneDNN cannot pack it (then forward is F.linear)."""
        packed = None
        w = self.weight
        if w.device.type == "cpu" and w.dtype in PACKABLE and torch.backends.mkldnn.is_available():
            try:
                with torch.no_grad():
                    packed = torch.ops.mkldnn._reorder_linear_weight(w.detach(), 1)
            except RuntimeError:  # bfloat16 on a CPU without AVX-512 (BW, VL, DQ) or AVX-NE-CONVERT: F.linear
                packed = None
        self.register_buffer("packed", packed, persistent=False)

    def _apply(self, fn, recurse=True):
        """`.to()` and friends move the plain weight; the packed copy (oneDNN's own tensor, which cannot be moved
        or cast) is remade from it."""
        self._buffers.pop("packed", None)
        super()._apply(fn, recurse)
        self._pack()
        return self

    def forward(self, x: Tensor) -> Tensor:
        bias = self.bias.detach() if self.bias is not None else None
        if self.packed is None:
            return F.linear(x, self.weight, bias)
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, oneDNN prepacked"

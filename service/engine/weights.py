"""The served form of a model's weights, made once when the engine loads it: `--quantization`, fusion, packing.

- `--quantization int8`: every linear of the encoder/decoder stacks becomes weight-only int8 with one scale per
  output channel (model/quantize.py). The LM head is not int8 in that form (`INT8_HEAD`): it adds ~0.3% perplexity
  on SmolLM2, which takes the total past 1% (benchmarks/precision.py). Where the matvec kernel has block scales
  (AVX-512 VNNI or AVX2 + F16C), the head becomes int8 with a float16 scale per 32 features of a row instead,
  llama.cpp's Q8_0 (`HEAD_INT8_BLOCKS`): at one stream the head is the largest read of a step (a bfloat16 copy of SmolLM2's: 57 of
  163 MB; of GPT-2 small's: 77 of 162), and Q8_0 halves it. Elsewhere it stays in the serving dtype, but for
  float32 on a CPU with our matvec kernel, where it becomes a bfloat16 copy (`HEAD_BF16`): at one stream a float32
  head read half of an int8 SmolLM2's step bytes (113 of 250 MB), and bfloat16 costs no measurable perplexity.
  Activations, norms, embeddings and the KV cache stay in the serving dtype.
- Then the projections that read the same input become one matmul each (model/fusion.py): self-attention's
  Q/K/V and a gated FFN's gate/up. Outputs are unchanged; at one stream a step makes fewer, larger calls.
- On a CPU, every linear that runs (the fused ones, W_O, W_2, the LM head; not the parts a fused layer replaced)
  gets its weight packed for a faster kernel at decode's few rows: bfloat16, float32 and int8 ones for our matvec
  kernel where the CPU has AVX-512 BF16 or AVX2 + FMA (model/cpu_linear.py: on AVX-512 1.5-2x oneDNN's rate at
  one row, about as fast up to 64 rows), elsewhere by oneDNN (model/prepack.py: about twice F.linear's rate). The
  plain weights stay too (inspection reads them): weights are held twice on a CPU. A bfloat16 model's RMSNorms
  run as one kernel call each there too (model/cpu_linear.py's `FusedRMSNorm`), and the runner binds the packed
  stack to the one-call step (model/fused_step.py)."""

from __future__ import annotations

import logging

import torch
from torch import nn
from torch.nn.utils import skip_init

from model.attention import MultiHeadAttention
from model.cpu_linear import (
    Q8_BLOCK,
    FusedRMSNorm,
    PackedBlockInt8Linear,
    PackedInt8Linear,
    PackedLinear,
    can_fuse_norm,
    can_pack,
    kernel,
)
from model.layers import FeedForward
from model.prepack import PrepackedLinear, can_prepack
from model.quantize import BlockInt8Linear, Int8Linear, quantize_int8

log = logging.getLogger("attnserve.weights")

QUANTIZATIONS = ("none", "int8")
INT8_HEAD = False  # the LM head (vocab x d_model, SmolLM2's largest matrix) in int8 too: benchmarks/precision.py
HEAD_INT8_BLOCKS = True  # with int8, the LM head in Q8_0's form where the matvec kernel has it (module docstring)
HEAD_BF16 = True  # with int8, a float32 LM head read as bfloat16 where the matvec kernel is (the module docstring)


def prepare(model: nn.Module, quantization: str | None = None, int8_head: bool = INT8_HEAD,
            prepack: bool = True) -> dict[str, int]:
    """Quantize (if asked), fuse and prepack `model` in place, after it is on its device and in its dtype.
    Returns counts for the log: linears quantized, projections fused, linears prepacked."""
    quantization = quantization or "none"
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization {quantization!r} is not one of {', '.join(QUANTIZATIONS)}")
    quantized = quantize_int8(model, include_head=int8_head) if quantization == "int8" else 0
    if quantization == "int8" and not int8_head:
        if HEAD_INT8_BLOCKS and _head_to_int8_blocks(model):
            quantized += 1
        elif HEAD_BF16:
            _head_to_bfloat16(model)
    fused = 0
    for module in model.modules():
        if isinstance(module, MultiHeadAttention | FeedForward):
            before = (getattr(module, "w_qkv", None), getattr(module, "w_13", None))
            module.fuse()
            fused += before != (getattr(module, "w_qkv", None), getattr(module, "w_13", None))
    packed = _prepack(model) if prepack else 0
    counts = {"quantized_linears": quantized, "fused_projections": fused, "prepacked_linears": packed}
    log.info("weights prepared", extra={"quantization": quantization, **counts})
    return counts


def _head_to_int8_blocks(model: nn.Module) -> bool:
    """The LM head becomes int8 with a scale per 32 features (untied from the embedding, which stays as it is)
    where the matvec kernel multiplies that form; whether it did."""
    head, module = getattr(model, "generator", None), kernel()
    if (type(head) is not nn.Linear or head.weight.device.type != "cpu" or head.in_features % Q8_BLOCK
            or module is None or not module.has_q8_blocks()):
        return False
    model.generator = BlockInt8Linear.of(head)
    return True


def _head_to_bfloat16(model: nn.Module) -> None:
    """A float32 LM head on a CPU with the matvec kernel becomes its own bfloat16 copy (untied from the embedding,
    which stays float32); its outputs stay float32."""
    head = getattr(model, "generator", None)
    if type(head) is not nn.Linear or head.weight.dtype != torch.float32 or not can_pack(head):
        return
    copy = skip_init(nn.Linear, head.in_features, head.out_features, bias=head.bias is not None, dtype=torch.bfloat16)
    copy.weight = nn.Parameter(head.weight.detach().bfloat16(), requires_grad=False)
    if head.bias is not None:
        copy.bias = nn.Parameter(head.bias.detach().bfloat16(), requires_grad=False)
    model.generator = copy


def _replaced(parent: nn.Module) -> set[str]:
    """The parts of `parent` that a fused layer computes instead (never called: nothing to pack)."""
    if isinstance(parent, MultiHeadAttention) and parent.w_qkv is not None:
        return {"w_q", "w_k", "w_v"}
    if isinstance(parent, FeedForward) and parent.w_13 is not None:
        return {"w_1", "w_3"}
    return set()


def _prepack(model: nn.Module) -> int:
    count = 0
    for parent in list(model.modules()):
        skip = _replaced(parent)
        for name, child in list(parent.named_children()):
            if name in skip:
                continue
            if can_fuse_norm(child):
                assert isinstance(child, nn.RMSNorm)
                setattr(parent, name, FusedRMSNorm(child))
            elif can_pack(child):
                setattr(parent, name, PackedLinear(child) if isinstance(child, nn.Linear)
                        else PackedInt8Linear(child) if isinstance(child, Int8Linear)
                        else PackedBlockInt8Linear(child) if isinstance(child, BlockInt8Linear) else child)
                count += 1
            elif isinstance(child, nn.Linear) and can_prepack(child):
                setattr(parent, name, PrepackedLinear(child))
                count += 1
    return count

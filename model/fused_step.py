"""A served decoder-only model's stack as one C++ call per step (model/csrc/decoder_step.cpp).

The eager step calls ~35 torch ops and modules a layer from Python; at one stream a 30-layer SmolLM2 spent about
as long there (~9 ms a step) as in reading its weights. `FusedStep` binds the stack's packed weights
(model/cpu_linear.py) once and runs every layer of a step in C++ with the GIL released: the same kernels for the
products, RMSNorm and the paged attention, and loops over each row for LayerNorm, rotary positions, the K/V write,
the FFN's activation (and gate) and the residual sums, each rounded to bfloat16 where the eager step's op rounds
(float32: as computed). Where the model's kinds allow, the embedding lookup and rotary angles (tables made once by
the model's own modules) and the final norm and LM head at the sampled rows run in the same call (`logits`): after
a stack that streamed its weights through the caches, each small op left in Python cost several times its warm
cost (benchmarks/NOTES.md section 19).

It takes the steps it can: a bfloat16 or float32 pre-norm decoder-only model whose projections are fused and
packed (a CPU with AVX-512 BF16, or AVX2 + FMA), Llama-shaped (RMSNorm, rotary, gated silu: SmolLM2, Llama, Qwen) or GPT-2-shaped
(LayerNorm, learned positions, GELU); steps that record no attention, of up to `MAX_ROWS` rows or, where every
product is as fast on the kernel at any rows (int8 x int8, bfloat16, and AVX-512's float32:
`cpu_linear.takes_any_rows`), prefill steps too; int8 weights on the kernel path. Everything else, and
`--enforce-eager`, runs the model's own modules."""

from __future__ import annotations

from types import ModuleType

import torch
from torch import Tensor, nn

from model import cpu_kernels
from model.cpu_linear import (
    MAX_ROWS,
    FusedRMSNorm,
    PackedBlockInt8Linear,
    PackedInt8Linear,
    PackedLinear,
    takes_any_rows,
)
from model.cpu_linear import kernel as matvec_kernel
from model.layers import DecoderLayer, LearnedPositions, RotaryPositions, SinusoidalPositions
from model.paged_cache import PagedKVCache, StepLayout
from model.quantize import int8_kernel_choice
from model.transformer import DecoderOnlyLM, Embedding


def kernel() -> ModuleType | None:
    module = cpu_kernels.load("decoder_step")
    return module if module is not None and module.available() else None


Packed = PackedLinear | PackedInt8Linear


TABLE_POSITIONS = 65536  # rotary tables up to this context (SmolLM2's 8,192: 2 x 1 MB in bfloat16); beyond, per step
ACTIVATIONS = ("silu", "relu", "gelu", "gelu_tanh")  # csrc/decoder_step.cpp's `Activation`, in its order


def _layers(model: DecoderOnlyLM) -> list[tuple[list[nn.Module | None], list[nn.Module | None]]]:
    """Each decoder layer's two norms and four linears (Q/K/V, W_O, gate/up or W_1, W_2), as the C++ step takes
    them."""
    out: list[tuple[list[nn.Module | None], list[nn.Module | None]]] = []
    for layer in model.decoder.layers:
        assert isinstance(layer, DecoderLayer)
        attn, ffn = layer.self_attn, layer.ffn
        w_in = ffn.w_13 if ffn.w_3 is not None else ffn.w_1
        out.append(([layer.res_self.norm, layer.res_ffn.norm], [attn.w_qkv, attn.w_o, w_in, ffn.w_2]))
    return out


def _is_norm(norm: nn.Module | None, layer_norm: bool, dtype: torch.dtype) -> bool:
    """A norm the step computes: LayerNorm, or RMSNorm (the bfloat16 kernel's, or a float32 torch one), with
    weights in the model's dtype."""
    kinds = (nn.LayerNorm,) if layer_norm else (nn.RMSNorm, FusedRMSNorm)
    weight = getattr(norm, "weight", None)
    return type(norm) in kinds and isinstance(weight, Tensor) and weight.dtype == dtype


def why_not(model: nn.Module) -> str:
    """Why `model` cannot run as a fused step ("" when it can)."""
    if not isinstance(model, DecoderOnlyLM):
        return "not a decoder-only model"
    cfg = model.config
    if cfg.norm != "pre" or not cfg.final_norm or cfg.activation not in ACTIVATIONS:
        return "not a pre-norm stack with a final norm and an activation the step has"
    layer_norm, dtype = cfg.norm_kind == "layernorm", model.tgt_embed.weight.dtype
    if dtype not in (torch.bfloat16, torch.float32):
        return f"activations in {dtype} (the step has bfloat16 and float32)"
    for norms, linears in _layers(model):
        if not all(isinstance(lin, Packed) for lin in linears):
            return "its projections are not fused and packed for the matvec kernel (a CPU with AVX-512 BF16 or AVX2 + FMA)"
        if not all(_is_norm(norm, layer_norm, dtype) for norm in norms):
            return "its norms are not ones the step computes"
    if kernel() is None:
        return f"the decoder_step kernel is unavailable ({cpu_kernels.why_not('decoder_step') or 'neither AVX-512 BF16 nor AVX2 + FMA'})"
    return ""


def hooked(module: nn.Module | None) -> bool:
    """Whether `module` has forward hooks (a fault injected in a test, an observer): then it runs as a module."""
    return module is not None and bool(module._forward_hooks or module._forward_pre_hooks)


def head_product(head: nn.Module, dtype: torch.dtype) -> int | None:
    """csrc/decoder_step.cpp's `Product` for an LM head whose forward runs on the matvec kernel at up to
    `MAX_ROWS` rows of `dtype` activations (0 plain, 1 int8 x int8 per-row scales, 2 Q8_0 block scales), or None
    where it takes another path (F.linear, Int8Linear's own)."""
    module = matvec_kernel()
    if module is None:
        return None
    if type(head) is PackedLinear:
        ok = head.weight.dtype == torch.bfloat16 or (head.weight.dtype == torch.float32 and dtype == torch.float32)
        return 0 if ok else None
    if type(head) is PackedInt8Linear:
        return 1 if head.q8 else 0
    if type(head) is PackedBlockInt8Linear:
        return 2 if module.has_q8_blocks() else None
    return None


class FusedStep:
    """The decoder stack of `model` (see `why_not`) bound to the C++ step."""

    def __init__(self, model: nn.Module) -> None:
        reason = why_not(model)
        module = kernel()
        if reason or not isinstance(model, DecoderOnlyLM) or module is None:
            raise ValueError(f"no fused step: {reason}")
        self.model, cfg = model, model.config
        self.empty = torch.empty(0, dtype=model.tgt_embed.weight.dtype)
        norms: list[Tensor] = []
        norm_biases: list[Tensor] = []
        eps: list[float] = []
        packed: list[Tensor] = []
        rows: list[int] = []
        scales: list[Tensor] = []
        biases: list[Tensor] = []
        q8: list[bool] = []
        empty = torch.empty(0)  # no scale, no bias
        self.int8 = False
        self.any_rows = True  # every product as fast on the kernel at a prefill's rows (cpu_linear.takes_any_rows)
        for layer_norms, linears in _layers(model):
            for norm in layer_norms:
                assert isinstance(norm, FusedRMSNorm | nn.LayerNorm | nn.RMSNorm) and isinstance(norm.weight, Tensor)
                norms.append(norm.weight.detach())
                bias = getattr(norm, "bias", None)
                norm_biases.append(bias.detach() if isinstance(bias, Tensor) else empty)
                eps.append(float(norm.eps if norm.eps is not None else torch.finfo(norm.weight.dtype).eps))
            for lin in linears:
                assert isinstance(lin, Packed)
                int8 = isinstance(lin, PackedInt8Linear)
                self.int8 |= int8
                self.any_rows &= takes_any_rows(lin)
                packed.append(lin.packed)
                rows.append(lin.out_features)
                scales.append(lin.scale_rows if isinstance(lin, PackedInt8Linear) else empty)
                biases.append(lin.bias_rows if lin.bias_rows is not None else empty)
                q8.append(isinstance(lin, PackedInt8Linear) and lin.q8)
        self.step = module.DecoderStep(norms, norm_biases, eps, cfg.norm_kind == "layernorm", packed, rows, scales,
                                       biases, q8, cfg.ffn == "gated", ACTIVATIONS.index(cfg.activation), cfg.h,
                                       cfg.kv_heads, cfg.d_k)
        self.bound: tuple[object, ...] = ()
        self.has_head = self._bind_head(model)
        self.has_inputs = self._bind_inputs(model)

    def _bind_inputs(self, model: DecoderOnlyLM) -> bool:
        """Bind the token embedding, the added position table and the rotary angles of every position (computed
        once by the model's own module) to the C++ step, where the model has those kinds; whether it did."""
        embed, added, rotary, dtype = model.tgt_embed, model.positions, model.rotary, model.tgt_embed.weight.dtype
        table = added.weight if isinstance(added, LearnedPositions) else added.pe if isinstance(
            added, SinusoidalPositions) else None
        if type(embed) is not Embedding or (added is not None and (table is None or table.dtype != dtype)):
            return False
        cos = sin = self.empty
        if rotary is not None:
            n = model.config.max_len
            if not isinstance(rotary, RotaryPositions) or n > TABLE_POSITIONS:
                return False
            with torch.no_grad():
                cos, sin = (t.reshape(n, -1).contiguous() for t in rotary(torch.arange(n)[None], dtype))
        self.step.bind_inputs(embed.weight.detach(), float(embed.scale), table.detach() if table is not None
                              else self.empty, cos, sin)
        return True

    def _bind_head(self, model: DecoderOnlyLM) -> bool:
        """Bind the final norm and the LM head to the C++ step where the head's own forward would run on the
        matvec kernel at a decode step's rows (`head_product`); whether it did."""
        self.bound = (model.generator, getattr(model.generator, "packed", None))  # repacking makes a new `packed`
        norm, head, dtype = model.decoder.norm, model.generator, model.tgt_embed.weight.dtype
        product = head_product(head, dtype)
        if product is None or not _is_norm(norm, model.config.norm_kind == "layernorm", dtype):
            return False
        assert isinstance(norm, FusedRMSNorm | nn.LayerNorm | nn.RMSNorm) and isinstance(norm.weight, Tensor)
        assert isinstance(head, Packed | PackedBlockInt8Linear)
        bias = getattr(norm, "bias", None)
        eps = float(norm.eps if norm.eps is not None else torch.finfo(norm.weight.dtype).eps)
        scale = head.block_scales if isinstance(head, PackedBlockInt8Linear) else getattr(head, "scale_rows", None)
        empty = torch.empty(0)
        self.int8 |= product > 0 or isinstance(head, PackedInt8Linear)
        self.step.bind_head(norm.weight.detach(), bias.detach() if isinstance(bias, Tensor) else empty, eps,
                            head.packed, head.out_features, scale if scale is not None else empty,
                            head.bias_rows if head.bias_rows is not None else empty, product)
        return True

    def logits(self, tokens: Tensor, positions: Tensor, cache: PagedKVCache, rows: Tensor) -> Tensor:
        """float32 logits (R, vocab) at `rows` (R,) of the step of `__call__`, the final norm and the head run in
        the same C++ call (where `has_head`; the model's own head where it no longer can)."""
        model = self.model
        head = model.generator
        if head is not self.bound[0] or getattr(head, "packed", None) is not self.bound[1]:  # replaced or repacked
            self.has_head = self._bind_head(model)
        if not self.has_head or hooked(head) or hooked(model.decoder.norm):  # a hook sees the module run
            return model.logits(self(tokens, positions, cache).index_select(0, rows)).float()
        x, cos, sin = self._inputs(tokens, positions)
        lay, pool = cache.layout, cache.pool
        return self.step.logits(x, cos, sin, pool.k, pool.v, lay.write_slots, lay.tables, lay.row_table,
                                lay.context_lens, rows)

    def _inputs(self, tokens: Tensor, positions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The embedded tokens (N, d_model) and their rotary angles (N, d_k) each (empty without rotary)."""
        if self.has_inputs and not hooked(self.model.tgt_embed) and not hooked(self.model.positions):
            return self.step.inputs(tokens, positions)
        model = self.model
        x = model.embed(tokens[None], positions[None], model.tgt_embed)[0]  # (N, d_model)
        rotary = model.rotations(positions[None], x.dtype)  # None where positions were added to x
        cos, sin = (t.reshape(tokens.size(0), -1) for t in rotary) if rotary is not None else (self.empty,) * 2
        return x, cos, sin

    def accepts(self, layout: StepLayout, num_rows: int) -> bool:
        """Whether this step's rows can all run fused: few enough for the matvec kernel (any number where every
        product takes any), no attention recorded, int8 products on the kernel path."""
        if (num_rows > MAX_ROWS and not self.any_rows) or layout.capture:
            return False
        return not self.int8 or int8_kernel_choice() in ("auto", "matvec")

    def __call__(self, tokens: Tensor, positions: Tensor, cache: PagedKVCache) -> Tensor:
        """Hidden states (N, d_model) after the final norm for tokens, positions (N,), their K/V written to the
        pool as the eager step writes them."""
        model, lay, pool = self.model, cache.layout, cache.pool
        x, cos, sin = self._inputs(tokens, positions)
        out = self.step.forward(x, cos, sin, pool.k, pool.v, lay.write_slots, lay.tables, lay.row_table,
                                lay.context_lens)
        norm = model.decoder.norm
        assert norm is not None
        return norm(out)

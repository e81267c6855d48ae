"""Fused projections give the same logits as the separate ones; weight-only int8 and bfloat16 stay within stated
tolerances of float32 (logits on random models, perplexity on the shipped shakespeare-gpt and a real text)."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from model.attention import MultiHeadAttention
from model.checkpoint import load_checkpoint
from model.config import preset
from model.cpu_linear import PackedInt8Linear
from model.cpu_linear import kernel as matvec_kernel
from model.data import encode_chars, eval_windows
from model.fusion import fuse_linears
from model.layers import FeedForward
from model.prepack import PrepackedLinear, can_prepack
from model.quantize import Int8Linear, dequantize, int8_kernel, int8_matmul, quantize_int8, quantize_weight
from model.transformer import DecoderOnlyLM, Transformer, build_model, num_parameters

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[2]
# the shapes under test: GPT-2's (learned positions, LayerNorm, biases, GELU; a narrow GPT-2 small), Llama's with
# grouped-query attention (4 query heads over 2 K/V heads, SwiGLU, RMSNorm, rotary), and the translator's
SHAPES = {
    "gpt2": preset("gpt2-small", n_decoder_layers=2, vocab_size=300, max_len=64),
    "tiny-llama": preset("tiny-llama"),
    "tiny-seq2seq": preset("tiny-seq2seq"),
}
INT8_LOGITS_TOL = 0.03  # max |int8 - float32| logit error, relative to the float32 logits' largest magnitude
BF16_LOGITS_TOL = 0.03


def _model(name: str) -> Transformer | DecoderOnlyLM:
    torch.manual_seed(0)
    return build_model(SHAPES[name]).eval()


def _logits(model: Transformer | DecoderOnlyLM) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, model.config.vocab_size, (2, 9), generator=g)
    with torch.no_grad():
        if isinstance(model, Transformer):
            return model(tokens, tokens[:, :5]).float()
        return model(tokens).float()


def _fuse(model: nn.Module) -> None:
    for mod in model.modules():
        if isinstance(mod, MultiHeadAttention | FeedForward):
            mod.fuse()


@pytest.mark.parametrize("name", list(SHAPES))
def test_fused_projections_give_the_same_logits(name: str) -> None:
    model = _model(name)
    before, params = _logits(model), num_parameters(model)
    _fuse(model)
    fused = [m for m in model.modules() if getattr(m, "w_qkv", None) is not None or getattr(m, "w_13", None)]
    assert fused, "nothing was fused"
    torch.testing.assert_close(_logits(model), before, rtol=1e-5, atol=1e-5)
    assert num_parameters(model) == params  # the parts read rows of the fused weight: counted once
    attn = next(m for m in model.modules() if isinstance(m, MultiHeadAttention) and m.w_qkv is not None)
    assert isinstance(attn.w_qkv, nn.Linear)
    assert attn.w_q.weight.data_ptr() == attn.w_qkv.weight.data_ptr()  # a view, not a copy
    torch.testing.assert_close(attn.w_qkv.weight[-attn.h_kv * attn.d_k:], attn.w_v.weight)


def test_llama_shape_fuses_gqa_qkv_and_gate_up() -> None:
    model = _model("tiny-llama")
    _fuse(model)
    layer = model.decoder.layers[0]
    h, h_kv, d_k = layer.self_attn.h, layer.self_attn.h_kv, layer.self_attn.d_k
    assert h_kv < h and layer.self_attn.w_qkv.out_features == (h + 2 * h_kv) * d_k
    assert layer.ffn.w_13.out_features == 2 * model.config.d_ff


def test_training_path_is_unfused() -> None:
    model = _model("tiny-llama")
    assert all(getattr(m, "w_qkv", None) is None and getattr(m, "w_13", None) is None for m in model.modules())
    assert "decoder.layers.0.self_attn.w_q.weight" in dict(model.named_parameters())


def test_fusing_mismatched_linears_is_refused() -> None:
    with pytest.raises(ValueError, match="share their input size"):
        fuse_linears(nn.Linear(4, 3), nn.Linear(5, 3))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
def test_prepacked_linear_equals_f_linear(dtype: torch.dtype, bias: bool) -> None:
    torch.manual_seed(0)
    linear = nn.Linear(48, 80, bias=bias).to(dtype)
    assert can_prepack(linear) == torch.backends.mkldnn.is_available()
    if not can_prepack(linear):
        pytest.skip("this torch has no oneDNN")
    packed = PrepackedLinear(linear)
    for rows in (1, 5, 40):
        x = torch.randn(2, rows, 48, dtype=dtype)
        with torch.inference_mode():
            y, ref = packed(x), linear(x)
        assert y.shape == ref.shape and y.dtype == dtype
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(y.float(), ref.float(), rtol=tol, atol=tol)
    assert sum(p.numel() for p in packed.parameters()) == sum(p.numel() for p in linear.parameters())


def test_quantized_weight_is_within_half_a_step() -> None:
    w = torch.randn(48, 40) * torch.logspace(-3, 1, 48)[:, None]  # rows of very different magnitudes
    q, scale = quantize_weight(w)
    assert q.dtype == torch.int8 and q.abs().max() <= 127
    assert torch.equal(scale, scale.bfloat16().float())  # bf16-exact: the packed kernel's scales are the same
    err = (dequantize(q, scale) - w).abs()
    assert (err <= scale[:, None] * 0.5 + 1e-7 + w.abs().amax(1, keepdim=True) * 0.005).all()


@pytest.mark.parametrize("rows", [1, 3, 8, 33])
@pytest.mark.parametrize("kernel", ["auto", "packed", "dequantize"])
def test_int8_matmul_matches_the_dequantized_weight(rows: int, kernel: str) -> None:
    torch.manual_seed(0)
    x, w = torch.randn(rows, 64), torch.randn(96, 64)
    q, scale = quantize_weight(w)
    with int8_kernel(kernel):
        y = int8_matmul(x.view(1, rows, 64), q, scale)
    assert y.shape == (1, rows, 96) and y.dtype == torch.float32
    ref = x @ dequantize(q, scale).T
    torch.testing.assert_close(y[0], ref, rtol=2e-2, atol=2e-2 * float(ref.abs().max()))


@pytest.mark.parametrize("name", list(SHAPES))
def test_int8_and_bf16_logits_stay_close_to_float32(name: str) -> None:
    model = _model(name)
    ref = _logits(model)
    scale = float(ref.abs().max())
    int8 = copy.deepcopy(model)
    n = quantize_int8(int8, include_head=True)
    assert n == sum(isinstance(m, nn.Linear) for m in model.modules())
    _fuse(int8)  # quantize, then fuse: the int8 rows stack with their scales
    assert any(isinstance(getattr(m, "w_qkv", None), Int8Linear) for m in int8.modules())
    for kernel in ("packed", "dequantize"):
        with int8_kernel(kernel):
            err = float((_logits(int8) - ref).abs().max())
        assert err <= INT8_LOGITS_TOL * scale, (kernel, err, scale)
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    assert float((_logits(bf16) - ref).abs().max()) <= BF16_LOGITS_TOL * scale


def test_int8_perplexity_of_the_shipped_model_is_within_one_percent() -> None:
    ckpt = load_checkpoint(ROOT / "model" / "checkpoints" / "shakespeare-gpt")
    model = ckpt.model.eval()
    assert isinstance(model, DecoderOnlyLM)
    ids = encode_chars(ckpt.tokenizer, (ROOT / "tests" / "data" / "shakespeare_val_slice.txt").read_text())[:2049]

    @torch.no_grad()
    def ppl(m: nn.Module) -> float:
        windows = list(eval_windows(ids, 256, 8))
        nll = sum(float(F.cross_entropy(m(x).float().flatten(0, 1), y.flatten(), reduction="sum")) for x, y in windows)
        return math.exp(nll / sum(y.numel() for _, y in windows))

    base = ppl(model)
    int8 = copy.deepcopy(model)
    quantize_int8(int8)
    _fuse(int8)
    for kernel in ("packed", "dequantize"):
        with int8_kernel(kernel):
            assert abs(ppl(int8) / base - 1) < 0.01, kernel
    if matvec_kernel() is not None:  # the decode kernel's product too (x in int8 blocks of 32 where has_q8())
        for parent in list(int8.modules()):
            for name, child in list(parent.named_children()):
                if type(child) is Int8Linear:
                    setattr(parent, name, PackedInt8Linear(child))
        with int8_kernel("matvec"):
            assert abs(ppl(int8) / base - 1) < 0.01, "matvec"
    assert abs(ppl(copy.deepcopy(model).to(torch.bfloat16)) / base - 1) < 0.01


def test_a_prepared_model_can_be_moved_again() -> None:
    """`.to()` on a model whose linears are prepacked (a second engine over the same model, say) recasts the
    plain weights and packs them anew; the packed layer then still equals F.linear in the new dtype."""
    torch.manual_seed(0)
    linear = nn.Linear(48, 80).to(torch.bfloat16)
    if not can_prepack(linear):
        pytest.skip("this torch has no oneDNN")
    # bfloat16 -> float32: oneDNN packs float32 on every CPU (bfloat16 only with AVX-512 or AVX-NE-CONVERT)
    packed = PrepackedLinear(linear).to(torch.float32)
    assert packed.weight.dtype == torch.float32 and packed.packed is not None
    x = torch.randn(3, 48)
    with torch.inference_mode():
        torch.testing.assert_close(packed(x), F.linear(x, packed.weight, packed.bias), rtol=1e-5, atol=1e-5)

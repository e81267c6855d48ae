"""The encoder-decoder equals torch.nn.Transformer (post-norm, ReLU) with the same weights copied across."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from torch import nn

from model.attention import MultiHeadAttention
from model.layers import DecoderLayer, EncoderLayer, FeedForward
from model.masks import causal_mask, combine_masks, padding_mask
from model.transformer import Transformer

pytestmark = pytest.mark.usefixtures("one_thread")

TOL = 1e-5


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def _copy_attention(ours: MultiHeadAttention, ref: nn.MultiheadAttention) -> None:
    ref.in_proj_weight.copy_(torch.cat([ours.w_q.weight, ours.w_k.weight, ours.w_v.weight]))
    assert ref.in_proj_bias is not None
    ref.in_proj_bias.copy_(torch.cat([ours.w_q.bias, ours.w_k.bias, ours.w_v.bias]))
    ref.out_proj.weight.copy_(ours.w_o.weight)
    ref.out_proj.bias.copy_(ours.w_o.bias)


def _copy_norm(ours: nn.LayerNorm, ref: nn.LayerNorm) -> None:
    ref.weight.copy_(ours.weight)
    ref.bias.copy_(ours.bias)


def _copy_ffn(ours: FeedForward, linear1: nn.Linear, linear2: nn.Linear) -> None:
    linear1.weight.copy_(ours.w_1.weight)
    linear1.bias.copy_(ours.w_1.bias)
    linear2.weight.copy_(ours.w_2.weight)
    linear2.bias.copy_(ours.w_2.bias)


def reference_for(model: Transformer) -> nn.Transformer:
    """nn.Transformer with the paper's post-norm layout and our weights (no final stack LayerNorms)."""
    cfg = model.config
    ref = nn.Transformer(
        d_model=cfg.d_model, nhead=cfg.h, num_encoder_layers=cfg.n_encoder_layers,
        num_decoder_layers=cfg.n_decoder_layers, dim_feedforward=cfg.d_ff, dropout=0.0, activation="relu",
        layer_norm_eps=cfg.layer_norm_eps, batch_first=True, norm_first=False,
    )
    ref.encoder.norm = None
    ref.decoder.norm = None
    with torch.no_grad():
        for ours_enc, ref_enc in zip(model.encoder.layers, ref.encoder.layers, strict=True):
            assert isinstance(ours_enc, EncoderLayer) and isinstance(ref_enc, nn.TransformerEncoderLayer)
            _copy_attention(ours_enc.self_attn, ref_enc.self_attn)
            _copy_ffn(ours_enc.ffn, ref_enc.linear1, ref_enc.linear2)
            _copy_norm(ours_enc.res_attn.norm, ref_enc.norm1)
            _copy_norm(ours_enc.res_ffn.norm, ref_enc.norm2)
        for ours_dec, ref_dec in zip(model.decoder.layers, ref.decoder.layers, strict=True):
            assert isinstance(ours_dec, DecoderLayer) and isinstance(ref_dec, nn.TransformerDecoderLayer)
            assert ours_dec.cross_attn is not None
            _copy_attention(ours_dec.self_attn, ref_dec.self_attn)
            _copy_attention(ours_dec.cross_attn, ref_dec.multihead_attn)
            _copy_ffn(ours_dec.ffn, ref_dec.linear1, ref_dec.linear2)
            _copy_norm(ours_dec.res_self.norm, ref_dec.norm1)
            _copy_norm(ours_dec.res_cross.norm, ref_dec.norm2)
            _copy_norm(ours_dec.res_ffn.norm, ref_dec.norm3)
    # Train mode (dropout is 0) keeps nn.TransformerEncoder off its inference fast path, which returns zeros at
    # padded positions; the slow path computes every position as ours does.
    return ref.train()


def _lengths_to_valid(lengths: list[int], total: int) -> torch.Tensor:
    return torch.arange(total)[None, :] < torch.tensor(lengths)[:, None]  # (B, total), True = real token


def test_stacks_equal_nn_transformer(seq2seq: Transformer) -> None:
    torch.manual_seed(1)
    ref = reference_for(seq2seq)
    d = seq2seq.config.d_model
    b, s, t = 3, 7, 6
    x_src, x_tgt = torch.randn(b, s, d), torch.randn(b, t, d)
    src_valid = _lengths_to_valid([7, 4, 5], s)
    tgt_valid = _lengths_to_valid([6, 3, 5], t)
    ref_causal = torch.ones(t, t, dtype=torch.bool).triu(1)  # nn.Transformer: True = may NOT attend
    with torch.no_grad():
        for padded in (False, True):
            ours_mem = seq2seq.encoder(x_src, padding_mask(src_valid) if padded else None)
            ref_mem = ref.encoder(x_src, src_key_padding_mask=~src_valid if padded else None)
            diff = max_diff(ours_mem, ref_mem)
            assert diff <= TOL, f"encoder stack differs from nn.TransformerEncoder (padded={padded}): {diff:.3g}"

            self_mask = combine_masks(causal_mask(t, t), padding_mask(tgt_valid) if padded else None)
            ours_out = seq2seq.decoder(
                x_tgt, self_mask, ours_mem, padding_mask(src_valid) if padded else None
            )
            ref_out = ref.decoder(
                x_tgt, ref_mem, tgt_mask=ref_causal,
                tgt_key_padding_mask=~tgt_valid if padded else None,
                memory_key_padding_mask=~src_valid if padded else None,
            )
            diff = max_diff(ours_out, ref_out)
            assert diff <= TOL, f"decoder stack differs from nn.TransformerDecoder (padded={padded}): {diff:.3g}"
            assert ours_out.abs().max() > 0.1, "degenerate outputs would make the comparison meaningless"


def test_full_model_is_embeddings_plus_positions_through_the_stacks(
    seq2seq: Transformer, paper_pe: Callable[[int, int], torch.Tensor]
) -> None:
    """Transformer.forward == generator(nn.Transformer(E_src[src] sqrt(d) + PE, E_tgt[tgt] sqrt(d) + PE))."""
    torch.manual_seed(2)
    ref = reference_for(seq2seq)
    cfg = seq2seq.config
    b, s, t = 2, 9, 8
    src = torch.randint(0, cfg.src_vocab_size or cfg.vocab_size, (b, s))
    tgt = torch.randint(0, cfg.vocab_size, (b, t))
    src_valid = _lengths_to_valid([9, 5], s)
    tgt_valid = _lengths_to_valid([8, 6], t)
    pe = paper_pe(max(s, t), cfg.d_model).float()
    scale = math.sqrt(cfg.d_model)
    with torch.no_grad():
        x_src = seq2seq.src_embed.weight[src] * scale + pe[:s]
        x_tgt = seq2seq.tgt_embed.weight[tgt] * scale + pe[:t]
        ref_hidden = ref(
            x_src, x_tgt, tgt_mask=torch.ones(t, t, dtype=torch.bool).triu(1),
            src_key_padding_mask=~src_valid, tgt_key_padding_mask=~tgt_valid,
            memory_key_padding_mask=~src_valid,
        )
        ref_logits = ref_hidden @ seq2seq.tgt_embed.weight.T  # tied pre-softmax linear
        logits = seq2seq(src, tgt, src_valid, tgt_valid)
    assert logits.shape == (b, t, cfg.vocab_size)
    diff = max_diff(logits, ref_logits)
    assert diff <= TOL, f"Transformer.forward differs from the nn.Transformer composition: {diff:.3g}"

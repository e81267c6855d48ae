"""The encoder-decoder Transformer (section 3.1, figure 1) and its decoder-only variant (GPT), built from the
same layers. One forward path serves training (no cache), serving (a KV cache) and inspection (a capture)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from model.attention import AttentionCapture
from model.config import TransformerConfig
from model.layers import (
    DecoderLayer,
    EncoderLayer,
    LearnedPositions,
    RotaryPositions,
    SinusoidalPositions,
    norm_layer,
)
from model.masks import causal_mask, combine_masks, padding_mask

if TYPE_CHECKING:
    from model.attention import KVCache


class Embedding(nn.Module):
    """Token embedding, multiplied by sqrt(d_model) as in section 3.4 when the config says so."""

    def __init__(self, vocab_size: int, d_model: int, scale: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab_size, d_model))
        nn.init.normal_(self.weight, std=d_model**-0.5 if scale else 0.02)
        self.scale = math.sqrt(d_model) if scale else 1.0

    def forward(self, tokens: Tensor) -> Tensor:
        x = nn.functional.embedding(tokens, self.weight)  # (B, T, d_model)
        return x * self.scale if self.scale != 1.0 else x


class Encoder(nn.Module):
    """A stack of N encoder layers (+ a final LayerNorm for pre-norm stacks)."""

    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(cfg, i) for i in range(cfg.n_encoder_layers))
        self.norm = norm_layer(cfg) if cfg.final_norm else None

    def forward(self, x: Tensor, mask: Tensor | None, capture: AttentionCapture | None = None,
                rotary: tuple[Tensor, Tensor] | None = None) -> Tensor:
        for layer in self.layers:
            x = layer(x, mask, capture, rotary)
        return self.norm(x) if self.norm is not None else x


class Decoder(nn.Module):
    """A stack of N decoder layers (+ a final LayerNorm for pre-norm stacks)."""

    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.n_decoder_layers))
        self.norm = norm_layer(cfg) if cfg.final_norm else None

    def forward(
        self,
        x: Tensor,
        self_mask: Tensor | None,
        memory: Tensor | None = None,
        memory_mask: Tensor | None = None,
        cache: KVCache | None = None,
        capture: AttentionCapture | None = None,
        rotary: tuple[Tensor, Tensor] | None = None,
    ) -> Tensor:
        for layer in self.layers:
            x = layer(x, self_mask, memory, memory_mask, cache, capture, rotary)
        return self.norm(x) if self.norm is not None else x


class _Base(nn.Module):
    """What both architectures share: target embedding + positions, the decoder stack and the generator."""

    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.config = cfg
        self.tgt_embed = Embedding(cfg.vocab_size, cfg.d_model, cfg.scale_embeddings)
        self.positions: nn.Module | None = None
        self.rotary: RotaryPositions | None = None
        if cfg.positional == "rotary":  # positions rotate q and k inside attention instead of adding to x
            scaling = dict(cfg.rope_scaling) if cfg.rope_scaling else None
            self.rotary = RotaryPositions(cfg.d_k, cfg.rope_theta, scaling)
        else:
            positions = SinusoidalPositions if cfg.positional == "sinusoidal" else LearnedPositions
            self.positions = positions(cfg.max_len, cfg.d_model)
        self.dropout = nn.Dropout(cfg.dropout)
        self.decoder = Decoder(cfg)
        self.generator = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)  # the pre-softmax linear
        if cfg.tie_embeddings:
            self.generator.weight = self.tgt_embed.weight

    def _init_linears(self, std: float | None) -> None:
        for name, p in self.named_parameters():
            if p.dim() == 2 and ("w_" in name):
                if std is None:
                    nn.init.xavier_uniform_(p)
                else:
                    nn.init.normal_(p, std=std)
            elif name.endswith("bias") and "norm" not in name:
                nn.init.zeros_(p)

    def embed(self, tokens: Tensor, positions: Tensor, embed: Embedding) -> Tensor:
        x = embed(tokens)  # (B, T, d_model)
        return self.dropout(x + self.positions(positions) if self.positions is not None else x)

    def rotations(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor] | None:
        """(cos, sin) of the positions for rotary attention in the activations' dtype, or None for added
        position encodings."""
        return self.rotary(positions, dtype) if self.rotary is not None else None

    def decode(
        self,
        tokens: Tensor,
        positions: Tensor | None = None,
        *,
        memory: Tensor | None = None,
        memory_valid: Tensor | None = None,
        valid: Tensor | None = None,
        cache: KVCache | None = None,
        capture: AttentionCapture | None = None,
    ) -> Tensor:
        """Decoder hidden states (B, T, d_model) for target tokens (B, T) at absolute `positions`.

        Without a cache the self-attention is causal over these T tokens (+ key padding from `valid`); with a
        cache, the cache stores this step's K/V and supplies the mask, so one code path serves both."""
        b, t = tokens.shape
        if positions is None:
            if cache is not None:
                raise ValueError("positions are required with a cache")
            positions = torch.arange(t, device=tokens.device).expand(b, t)
        self_mask = None
        memory_mask = padding_mask(memory_valid) if memory_valid is not None else None
        if cache is None:  # training and inspection; the serving engine checks lengths before it batches
            if t > self.config.max_len:
                raise ValueError(f"sequence length {t} exceeds max_len {self.config.max_len}")
            self_mask = combine_masks(
                causal_mask(t, t, tokens.device), padding_mask(valid) if valid is not None else None
            )
        x = self.embed(tokens, positions, self.tgt_embed)
        return self.decoder(x, self_mask, memory, memory_mask, cache, capture, self.rotations(positions, x.dtype))

    def logits(self, hidden: Tensor) -> Tensor:
        return self.generator(hidden)  # (..., vocab)


class Transformer(_Base):
    """The encoder-decoder Transformer: encode the source once, decode the target autoregressively."""

    def __init__(self, cfg: TransformerConfig) -> None:
        assert cfg.is_encoder_decoder
        super().__init__(cfg)
        src_vocab = cfg.src_vocab_size or cfg.vocab_size
        if cfg.share_embeddings:
            assert src_vocab == cfg.vocab_size, "shared embeddings need one vocabulary"
            self.src_embed = self.tgt_embed
        else:
            self.src_embed = Embedding(src_vocab, cfg.d_model, cfg.scale_embeddings)
        self.encoder = Encoder(cfg)
        self._init_linears(std=None)

    def encode(
        self, src: Tensor, src_valid: Tensor | None = None, capture: AttentionCapture | None = None
    ) -> Tensor:
        """Encoder output (B, S, d_model), the `memory` the decoder attends to."""
        b, s = src.shape
        if s > self.config.max_len:
            raise ValueError(f"source length {s} exceeds max_len {self.config.max_len}")
        positions = torch.arange(s, device=src.device).expand(b, s)
        mask = padding_mask(src_valid) if src_valid is not None else None
        x = self.embed(src, positions, self.src_embed)
        return self.encoder(x, mask, capture, self.rotations(positions, x.dtype))

    def forward(
        self,
        src: Tensor,
        tgt: Tensor,
        src_valid: Tensor | None = None,
        tgt_valid: Tensor | None = None,
        capture: AttentionCapture | None = None,
    ) -> Tensor:
        """Teacher forcing: logits (B, T, vocab) for every target position in one pass."""
        memory = self.encode(src, src_valid, capture)
        hidden = self.decode(tgt, memory=memory, memory_valid=src_valid, valid=tgt_valid, capture=capture)
        return self.logits(hidden)


class DecoderOnlyLM(_Base):
    """The decoder-only language model (GPT): decoder layers without cross-attention."""

    def __init__(self, cfg: TransformerConfig) -> None:
        assert not cfg.is_encoder_decoder
        super().__init__(cfg)
        self._init_linears(std=0.02)

    def forward(
        self,
        tokens: Tensor,
        positions: Tensor | None = None,
        cache: KVCache | None = None,
        capture: AttentionCapture | None = None,
        valid: Tensor | None = None,
    ) -> Tensor:
        """Logits (B, T, vocab) for next-token prediction at every position."""
        return self.logits(self.decode(tokens, positions, valid=valid, cache=cache, capture=capture))


def build_model(cfg: TransformerConfig) -> Transformer | DecoderOnlyLM:
    """The architecture the config names."""
    return Transformer(cfg) if cfg.is_encoder_decoder else DecoderOnlyLM(cfg)


def num_parameters(model: nn.Module) -> int:
    """Unique parameters (tied matrices counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())

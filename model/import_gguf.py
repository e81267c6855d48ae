"""GGUF files (llama.cpp's format) -> our decoder-only model, read with the `gguf` package (the format's own
library): the metadata becomes a `TransformerConfig`, the embedded vocabulary a `tokenizers` tokenizer
(model/gguf_tokenizer.py), the embedded chat template is kept, and every tensor (F32, F16, BF16, Q8_0, Q4_0,
Q4_1, K-quants: whatever `gguf.quants` dequantizes) is dequantized to float32 and renamed to ours. Nothing of
the format reaches the model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from model.checkpoint_files import Checkpoint, CheckpointError, load_weights
from model.config import TransformerConfig
from model.transformer import DecoderOnlyLM

SERVED = ("llama", "qwen2")  # llama.cpp writes Mistral and SmolLM as "llama" too

# Per layer, GGUF name -> ours (blk.{i}. <-> decoder.layers.{i}.).
GGUF_LAYER = {
    "attn_q": "self_attn.w_q", "attn_k": "self_attn.w_k", "attn_v": "self_attn.w_v",
    "attn_output": "self_attn.w_o", "ffn_gate": "ffn.w_1", "ffn_up": "ffn.w_3", "ffn_down": "ffn.w_2",
    "attn_norm": "res_self.norm", "ffn_norm": "res_ffn.norm",
}
GGUF_TOP = {"token_embd.weight": "tgt_embed.weight", "output_norm.weight": "decoder.norm.weight",
            "output.weight": "generator.weight"}


def _fields(reader: Any) -> dict[str, Any]:
    """Every metadata value as a Python value (arrays of tokens and merges excepted: the tokenizer reads those)."""
    skip = ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.scores", "tokenizer.ggml.token_type")
    return {k: f.contents() for k, f in reader.fields.items() if k not in skip}


def gguf_config(meta: dict[str, Any], names: set[str], file: str) -> TransformerConfig:
    """The GGUF metadata (`{arch}.block_count`, ...) as our config; an architecture we cannot serve is named."""
    arch = meta.get("general.architecture")
    if arch not in SERVED:
        raise CheckpointError(f"{file}: architecture {arch!r} is not served (served GGUF architectures: "
                              f"{', '.join(SERVED)})")

    def get(key: str, default: Any = None) -> Any:
        value = meta.get(f"{arch}.{key}", default)
        if value is None:
            raise CheckpointError(f"{file}: metadata {arch}.{key} is missing")
        return value

    d_model, h = int(get("embedding_length")), int(get("attention.head_count"))
    if int(get("rope.dimension_count", d_model // h)) != d_model // h:
        raise CheckpointError(f"{file}: partial rotary ({arch}.rope.dimension_count) is not supported")
    scaling = meta.get(f"{arch}.rope.scaling.type")
    if scaling not in (None, "none", "linear"):
        raise CheckpointError(f"{file}: rope scaling {scaling!r} is not supported")
    rope_scaling = None
    if scaling == "linear":
        rope_scaling = (("factor", float(get("rope.scaling.factor"))), ("rope_type", "linear"))
    vocab = meta.get(f"{arch}.vocab_size") or int(meta["tokenizer.ggml.vocab_size"])
    try:
        return TransformerConfig(
            arch="decoder-only", vocab_size=int(vocab), d_model=d_model, h=h,
            n_kv_heads=int(get("attention.head_count_kv", h)), d_ff=int(get("feed_forward_length")),
            n_decoder_layers=int(get("block_count")), n_encoder_layers=0, max_len=int(get("context_length")),
            norm="pre", norm_kind="rmsnorm", positional="rotary", rope_theta=float(get("rope.freq_base", 10000.0)),
            rope_scaling=rope_scaling, activation="silu", ffn="gated", bias=False,
            qkv_bias=True if "blk.0.attn_q.bias" in names else None,
            layer_norm_eps=float(get("attention.layer_norm_rms_epsilon")), scale_embeddings=False,
            tie_embeddings="output.weight" not in names, dropout=0.0, attn_dropout=0.0,
        )
    except ValueError as e:
        raise CheckpointError(f"{file}: {e}") from e


def unpermute(w: Tensor, heads: int) -> Tensor:
    """llama.cpp's converter interleaves each head's rotary pairs ((i, i + d/2) -> (2i, 2i + 1)) in the Q and K
    weights of "llama" files; undo it, as transformers' GGUF loader does, to get Hugging Face's layout."""
    d = w.shape[0] // heads // 2
    return w.reshape(heads, d, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def read_tensor(t: Any) -> Tensor:
    """One GGUF tensor, dequantized to float32, in PyTorch's (out, in) order (GGUF lists dims reversed)."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    data = np.asarray(t.data)
    if t.tensor_type == GGMLQuantizationType.BF16:  # stored as raw 16-bit words: the top half of a float32
        values = (data.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    elif t.tensor_type in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
        values = data.astype(np.float32)
    else:
        values = dequantize(data, t.tensor_type)
    shape = tuple(int(n) for n in reversed(list(t.shape)))
    return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32).reshape(shape))


def import_gguf(path: str | Path, progress: bool = True) -> Checkpoint:
    """A GGUF file -> our decoder-only model, its tokenizer and its chat template."""
    from gguf import GGUFReader

    from model.gguf_tokenizer import tokenizer_from_gguf

    file = Path(path)
    try:
        reader = GGUFReader(str(file))
    except (ValueError, OSError, KeyError) as e:
        raise CheckpointError(f"{file.name}: not a readable GGUF file ({e})") from e
    meta = _fields(reader)
    names = {t.name for t in reader.tensors}
    cfg = gguf_config(meta, names, file.name)
    try:
        vocab = tokenizer_from_gguf(reader)
    except ValueError as e:
        raise CheckpointError(f"{file.name}: {e}") from e
    permuted = meta["general.architecture"] == "llama"
    ours: dict[str, Tensor] = {}
    for t in tqdm(reader.tensors, desc=f"loading {file.name}", unit="tensor", disable=not progress, leave=False):
        name = t.name
        if name in GGUF_TOP:
            if not (name == "output.weight" and cfg.tie_embeddings):
                ours[GGUF_TOP[name]] = read_tensor(t)
            continue
        parts = name.split(".")  # blk.{i}.{kind}.{weight|bias}
        if parts[0] != "blk" or len(parts) != 4 or parts[2] not in GGUF_LAYER:
            if name.startswith("rope_freqs"):
                raise CheckpointError(f"{file.name}: per-dimension rope factors (rope_freqs) are not supported")
            continue  # e.g. llama.cpp's precomputed tables, which we compute ourselves
        w = read_tensor(t)
        if permuted and parts[2] in ("attn_q", "attn_k") and parts[3] == "weight":
            w = unpermute(w, cfg.h if parts[2] == "attn_q" else cfg.kv_heads)
        ours[f"decoder.layers.{parts[1]}.{GGUF_LAYER[parts[2]]}.{parts[3]}"] = w
    model = DecoderOnlyLM(cfg)
    load_weights(model, ours, file.name)
    if vocab.tokenizer.vocab_size > cfg.vocab_size:
        raise CheckpointError(f"{file.name}: {vocab.tokenizer.vocab_size} tokens but vocab_size {cfg.vocab_size}")
    return Checkpoint(model.eval(), vocab.tokenizer, file, "gguf", chat_template=vocab.chat_template,
                      add_bos=vocab.add_bos)

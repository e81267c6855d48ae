"""Hugging Face Llama-family folders (LlamaForCausalLM, and the families of the same shape: Mistral without a
sliding window, Qwen2 with its Q/K/V biases) -> our decoder-only model with RMSNorm, rotary positions, the gated
SiLU FFN and grouped-query attention. config.json becomes a `TransformerConfig`; sharded or single safetensors,
tokenizer.json and tokenizer_config.json's special tokens are read; the chat template stays on disk, where the
service reads it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import Tensor

from model.checkpoint_files import (
    Checkpoint,
    CheckpointError,
    load_weights,
    read_json,
    read_safetensors,
    read_tokenizer,
)
from model.config import TransformerConfig
from model.tokenizer import SpecialTokens
from model.transformer import DecoderOnlyLM

FAMILIES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}

# Per layer, Hugging Face name -> ours (model.layers.{i}. <-> decoder.layers.{i}.).
LLAMA_LAYER = {
    "self_attn.q_proj": "self_attn.w_q", "self_attn.k_proj": "self_attn.w_k", "self_attn.v_proj": "self_attn.w_v",
    "self_attn.o_proj": "self_attn.w_o",
    "mlp.gate_proj": "ffn.w_1", "mlp.up_proj": "ffn.w_3", "mlp.down_proj": "ffn.w_2",
    "input_layernorm": "res_self.norm", "post_attention_layernorm": "res_ffn.norm",
}
LLAMA_TOP = {"model.embed_tokens.weight": "tgt_embed.weight", "model.norm.weight": "decoder.norm.weight",
             "lm_head.weight": "generator.weight"}


def llama_family(meta: dict[str, Any]) -> bool:
    """Whether a Hugging Face config.json names an architecture this importer serves."""
    archs = meta.get("architectures") or []
    return meta.get("model_type") in FAMILIES or any(a in FAMILIES.values() for a in archs)


def llama_config(hf: dict[str, Any], file: str = "config.json") -> TransformerConfig:
    """A Llama-family config.json as ours; what we cannot honour is refused by name."""
    kind = hf.get("model_type", "llama")
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise CheckpointError(f"{file}: hidden_act {act!r} is not supported (only silu)")
    d_model, h = hf["hidden_size"], hf["num_attention_heads"]
    if hf.get("head_dim") not in (None, d_model // h):
        raise CheckpointError(f"{file}: head_dim {hf['head_dim']} != hidden_size / num_attention_heads")
    window = hf.get("sliding_window")
    sliding = hf.get("use_sliding_window", kind == "mistral") or "sliding_attention" in hf.get("layer_types", [])
    if window is not None and sliding and window < hf.get("max_position_embeddings", 0):
        raise CheckpointError(f"{file}: sliding-window attention ({window} tokens) is not supported")
    if hf.get("mlp_bias"):
        raise CheckpointError(f"{file}: mlp_bias is not supported")
    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})  # transformers 5 writes the former
    theta = float(rope.pop("rope_theta", hf.get("rope_theta", 10000.0)))
    scaling = rope if rope.get("rope_type", rope.get("type", "default")) != "default" else None
    try:
        return TransformerConfig(
            arch="decoder-only", vocab_size=hf["vocab_size"], d_model=d_model, h=h,
            n_kv_heads=hf.get("num_key_value_heads") or h, d_ff=hf["intermediate_size"],
            n_decoder_layers=hf["num_hidden_layers"], n_encoder_layers=0,
            max_len=hf.get("max_position_embeddings", 2048), norm="pre", norm_kind="rmsnorm",
            positional="rotary", rope_theta=theta,
            rope_scaling=tuple(sorted(scaling.items())) if scaling else None,
            activation="silu", ffn="gated", bias=bool(hf.get("attention_bias", False)),
            qkv_bias=True if kind == "qwen2" else None, layer_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            scale_embeddings=False, tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            dropout=0.0, attn_dropout=0.0,
        )
    except KeyError as e:
        raise CheckpointError(f"{file}: {e.args[0]} is missing") from e
    except ValueError as e:
        raise CheckpointError(f"{file}: {e}") from e


def llama_state(hf: dict[str, Tensor], cfg: TransformerConfig) -> dict[str, Tensor]:
    """Hugging Face Llama tensor names -> ours (the same matrices: both store nn.Linear's (out, in))."""
    ours: dict[str, Tensor] = {}
    for theirs, mine in LLAMA_TOP.items():
        if theirs in hf and not (mine == "generator.weight" and cfg.tie_embeddings):
            ours[mine] = hf[theirs]
    for i in range(cfg.n_decoder_layers):
        for theirs, mine in LLAMA_LAYER.items():
            for suffix in ("weight", "bias"):
                name = f"model.layers.{i}.{theirs}.{suffix}"
                if name in hf:
                    ours[f"decoder.layers.{i}.{mine}.{suffix}"] = hf[name]
    return ours


def import_llama(path: str | Path) -> Checkpoint:
    """A Hugging Face Llama-family folder -> our decoder-only model and tokenizer."""
    folder = Path(path)
    cfg = llama_config(read_json(folder / "config.json"))
    tok_cfg = read_json(folder / "tokenizer_config.json") if (folder / "tokenizer_config.json").is_file() else {}
    specials = SpecialTokens(**{k: _token(tok_cfg.get(f"{k}_token")) for k in ("bos", "eos", "pad", "unk")})
    tokenizer = read_tokenizer(folder, specials)
    model = DecoderOnlyLM(cfg)
    load_weights(model, llama_state(read_safetensors(folder), cfg))
    add_bos = bool(tok_cfg.get("add_bos_token", False)) and tokenizer.bos_id is not None
    return Checkpoint(model.eval(), tokenizer, folder, "llama", add_bos=add_bos)


def _token(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string, an AddedToken dict, or absent."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None

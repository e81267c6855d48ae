"""Hugging Face GPT-2 folders: imported into our decoder-only model, and ours exported to that layout (so other
servers can load the same weights)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
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
from model.tokenizer import SpecialTokens, Tokenizer
from model.transformer import DecoderOnlyLM


def is_gpt2_folder(path: str | Path) -> bool:
    file = Path(path) / "config.json"
    if not file.is_file():
        return False
    try:
        data = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False
    return isinstance(data, dict) and data.get("model_type") == "gpt2"


_GPT2_ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu", "relu": "relu"}


def _gpt2_config(hf: dict[str, Any]) -> TransformerConfig:
    act = hf.get("activation_function", "gelu_new")
    if act not in _GPT2_ACTIVATIONS:
        raise CheckpointError(f"config.json: activation_function {act!r} is not supported")
    d_model = hf["n_embd"]
    return TransformerConfig(
        arch="decoder-only", vocab_size=hf["vocab_size"], d_model=d_model, h=hf["n_head"],
        d_ff=hf.get("n_inner") or 4 * d_model, n_decoder_layers=hf["n_layer"], max_len=hf["n_positions"],
        norm="pre", positional="learned", activation=_GPT2_ACTIVATIONS[act],  # type: ignore[arg-type]
        layer_norm_eps=hf.get("layer_norm_epsilon", 1e-5), scale_embeddings=False, tie_embeddings=True,
        dropout=0.0, attn_dropout=0.0, n_encoder_layers=0,
    )


def _gpt2_tokenizer(folder: Path) -> Tokenizer:
    specials = SpecialTokens(bos="<|endoftext|>", eos="<|endoftext|>", pad=None, unk=None)
    if (folder / "tokenizer.json").is_file():
        return read_tokenizer(folder, specials)
    vocab, merges = folder / "vocab.json", folder / "merges.txt"
    if not (vocab.is_file() and merges.is_file()):
        raise CheckpointError("tokenizer.json: missing (and no vocab.json + merges.txt to build it from)")
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers

    tok = HFTokenizer(models.BPE.from_file(str(vocab), str(merges)))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return Tokenizer(tok, specials)


# The GPT-2 layout, one table for import and export: Hugging Face name -> ours. Per layer (h.{i}. <->
# decoder.layers.{i}.) each entry also says whether it is a Conv1D weight, stored transposed (y = x W + b);
# c_attn holds q, k and v side by side along its output axis.
GPT2_TOP = {"wte.weight": "tgt_embed.weight", "wpe.weight": "positions.weight",
            "ln_f.weight": "decoder.norm.weight", "ln_f.bias": "decoder.norm.bias"}
GPT2_QKV = ("w_q", "w_k", "w_v")
GPT2_LAYER = {
    "attn.c_proj.weight": ("self_attn.w_o.weight", True), "attn.c_proj.bias": ("self_attn.w_o.bias", False),
    "mlp.c_fc.weight": ("ffn.w_1.weight", True), "mlp.c_fc.bias": ("ffn.w_1.bias", False),
    "mlp.c_proj.weight": ("ffn.w_2.weight", True), "mlp.c_proj.bias": ("ffn.w_2.bias", False),
    "ln_1.weight": ("res_self.norm.weight", False), "ln_1.bias": ("res_self.norm.bias", False),
    "ln_2.weight": ("res_ffn.norm.weight", False), "ln_2.bias": ("res_ffn.norm.bias", False),
}


def import_gpt2(path: str | Path) -> Checkpoint:
    """A Hugging Face GPT-2 folder -> our decoder-only model (Conv1D weights transposed, c_attn split in 3)."""
    folder = Path(path)
    cfg = _gpt2_config(read_json(folder / "config.json"))
    hf = read_safetensors(folder)
    hf = {k.removeprefix("transformer."): v for k, v in hf.items()}
    d = cfg.d_model
    try:
        ours: dict[str, Tensor] = {mine: hf[theirs] for theirs, mine in GPT2_TOP.items()}
        for i in range(cfg.n_decoder_layers):
            p, q = f"h.{i}.", f"decoder.layers.{i}."
            w, b = hf[p + "attn.c_attn.weight"], hf[p + "attn.c_attn.bias"]  # Conv1D: (d, 3d), y = x W + b
            for j, name in enumerate(GPT2_QKV):
                ours[q + f"self_attn.{name}.weight"] = w[:, j * d : (j + 1) * d].t()
                ours[q + f"self_attn.{name}.bias"] = b[j * d : (j + 1) * d]
            for theirs, (mine, conv1d) in GPT2_LAYER.items():
                ours[q + mine] = hf[p + theirs].t() if conv1d else hf[p + theirs]
    except KeyError as e:
        raise CheckpointError(f"model.safetensors: GPT-2 weight {e.args[0]} is missing") from e
    model = DecoderOnlyLM(cfg)
    load_weights(model, ours)
    return Checkpoint(model.eval(), _gpt2_tokenizer(folder), folder, "gpt2")


def export_gpt2(model: DecoderOnlyLM, tokenizer: Tokenizer, path: str | Path) -> Path:
    """Write our decoder-only model as a Hugging Face GPT-2 folder (for baselines that load the same weights)."""
    cfg = model.config
    if (
        cfg.is_encoder_decoder or cfg.norm != "pre" or cfg.positional != "learned" or not cfg.tie_embeddings
        or cfg.scale_embeddings or not cfg.bias
    ):
        raise ValueError(
            "only pre-norm, learned-position, tied, unscaled-embedding decoder-only models with biases have a "
            "GPT-2 layout"
        )
    act = {"gelu_tanh": "gelu_new", "gelu": "gelu", "relu": "relu"}[cfg.activation]
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    hf: dict[str, Tensor] = {f"transformer.{theirs}": sd[mine] for theirs, mine in GPT2_TOP.items()}
    for i in range(cfg.n_decoder_layers):
        p, q = f"transformer.h.{i}.", f"decoder.layers.{i}."
        hf[p + "attn.c_attn.weight"] = torch.cat([sd[q + f"self_attn.{n}.weight"].t() for n in GPT2_QKV], 1)
        hf[p + "attn.c_attn.bias"] = torch.cat([sd[q + f"self_attn.{n}.bias"] for n in GPT2_QKV])
        for theirs, (mine, conv1d) in GPT2_LAYER.items():
            hf[p + theirs] = sd[q + mine].t() if conv1d else sd[q + mine]
    save_file({k: v.contiguous() for k, v in hf.items()}, str(folder / "model.safetensors"), metadata={"format": "pt"})
    eos = tokenizer.eos_id if tokenizer.eos_id is not None else 0
    bos = tokenizer.bos_id if tokenizer.bos_id is not None else eos
    hf_cfg = {
        "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": cfg.vocab_size,
        "n_embd": cfg.d_model, "n_head": cfg.h, "n_layer": cfg.n_decoder_layers, "n_positions": cfg.max_len,
        "n_inner": cfg.d_ff, "activation_function": act, "layer_norm_epsilon": cfg.layer_norm_eps,
        "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, "bos_token_id": bos, "eos_token_id": eos,
        "tie_word_embeddings": True,
    }
    (folder / "config.json").write_text(json.dumps(hf_cfg, indent=2) + "\n")
    tokenizer.save(folder / "tokenizer.json")
    return folder

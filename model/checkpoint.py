"""Checkpoints: a folder with config.json + model.safetensors + tokenizer.json (+ MODEL_CARD.md).

Weights are read only through safetensors: nothing is ever unpickled. Hugging Face GPT-2 folders are imported
into the decoder-only model (and ours exported to that format, so other servers can load the same weights)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from model.config import TransformerConfig
from model.tokenizer import SpecialTokens, Tokenizer
from model.transformer import DecoderOnlyLM, Transformer, build_model

FORMAT = "attnserve-checkpoint/1"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file and the problem."""


@dataclass
class Checkpoint:
    """A loaded model with its tokenizer and where it came from."""

    model: Transformer | DecoderOnlyLM
    tokenizer: Tokenizer
    path: Path
    source_format: str  # "attnserve" or "gpt2"

    @property
    def config(self) -> TransformerConfig:
        return self.model.config


def _unique_state(model: nn.Module) -> dict[str, Tensor]:
    """State dict without the second name of tied parameters (safetensors stores each tensor once)."""
    seen: set[int] = set()
    out: dict[str, Tensor] = {}
    for name, t in model.state_dict(keep_vars=True).items():
        if id(t) in seen:
            continue
        seen.add(id(t))
        out[name] = t.detach()
    return out


def save_checkpoint(
    model: Transformer | DecoderOnlyLM,
    tokenizer: Tokenizer,
    path: str | Path,
    dtype: str = "float32",
    card: str | None = None,
) -> Path:
    """Write the folder; `dtype` is the storage precision (the loader casts to the serving dtype)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    meta = {
        "format": FORMAT,
        "architecture": model.config.to_dict(),
        "special_tokens": tokenizer.specials.__dict__,
        "dtype": dtype,
    }
    (path / "config.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    tensors = {k: v.to(DTYPES[dtype]).contiguous().cpu() for k, v in _unique_state(model).items()}
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save(path / "tokenizer.json")
    if card is not None:
        (path / "MODEL_CARD.md").write_text(card)
    return path


def _read_json(file: Path) -> dict[str, Any]:
    if not file.is_file():
        raise CheckpointError(f"{file.name}: missing in {file.parent.name}/")
    try:
        data = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file.name}: not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{file.name}: expected a JSON object")
    return data


def _refuse_pickles(folder: Path) -> None:
    """Without model.safetensors, pickled weights are the likely mistake: name them rather than another file."""
    if (folder / "model.safetensors").is_file():
        return
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise CheckpointError(
            f"{pickles[0]}: pickle-based weights are refused (loading them can run arbitrary code); "
            "convert them to model.safetensors"
        )


def _read_safetensors(folder: Path) -> dict[str, Tensor]:
    file = folder / "model.safetensors"
    if not file.is_file():
        _refuse_pickles(folder)
        raise CheckpointError(f"model.safetensors: missing in {folder.name}/")
    try:
        with safe_open(str(file), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"model.safetensors: corrupt or not a safetensors file ({e})") from e


def _load_weights(model: nn.Module, tensors: dict[str, Tensor], file: str = "model.safetensors") -> None:
    expected = _unique_state(model)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{file}: weights do not fit config.json (missing: {missing[:5]}, unexpected: {unexpected[:5]})"
        )
    for name, want in expected.items():
        got = tensors[name]
        if tuple(got.shape) != tuple(want.shape):
            raise CheckpointError(
                f"{file}: {name} has shape {tuple(got.shape)}, config.json implies {tuple(want.shape)}"
            )
        if not torch.isfinite(got.float()).all():
            raise CheckpointError(f"{file}: {name} contains NaN or infinite values")
        with torch.no_grad():
            want.copy_(got.to(want.dtype))


def _read_tokenizer(folder: Path, specials: SpecialTokens) -> Tokenizer:
    file = folder / "tokenizer.json"
    if not file.is_file():
        raise CheckpointError(f"tokenizer.json: missing in {folder.name}/")
    try:
        return Tokenizer.from_file(file, specials)
    except Exception as e:  # tokenizers raises plain Exception on malformed files
        raise CheckpointError(f"tokenizer.json: cannot be read ({e})") from e


def is_gpt2_folder(path: str | Path) -> bool:
    file = Path(path) / "config.json"
    if not file.is_file():
        return False
    try:
        data = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False
    return isinstance(data, dict) and data.get("model_type") == "gpt2"


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Load one of our folders, or a Hugging Face GPT-2 folder, in float32 on the CPU."""
    folder = Path(path)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: not a checkpoint folder")
    _refuse_pickles(folder)  # before config.json, so a folder of pickled weights is named as such
    if is_gpt2_folder(folder):
        return import_gpt2(folder)
    meta = _read_json(folder / "config.json")
    if meta.get("format") != FORMAT or "architecture" not in meta:
        raise CheckpointError(f"config.json: not an {FORMAT} file (format={meta.get('format')!r})")
    try:
        cfg = TransformerConfig.from_dict(meta["architecture"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"config.json: invalid architecture ({e})") from e
    specials = SpecialTokens(**meta.get("special_tokens", {}))
    tokenizer = _read_tokenizer(folder, specials)
    model = build_model(cfg)
    _load_weights(model, _read_safetensors(folder))
    if tokenizer.vocab_size > cfg.vocab_size:
        raise CheckpointError(
            f"tokenizer.json: {tokenizer.vocab_size} tokens but config.json has vocab_size {cfg.vocab_size}"
        )
    return Checkpoint(model.eval(), tokenizer, folder, "attnserve")


# --- Hugging Face GPT-2 -------------------------------------------------------------------------------------

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
        return _read_tokenizer(folder, specials)
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
    cfg = _gpt2_config(_read_json(folder / "config.json"))
    hf = _read_safetensors(folder)
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
    _load_weights(model, ours)
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

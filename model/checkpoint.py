"""Checkpoints: our own format is a folder with config.json + model.safetensors + tokenizer.json (+ MODEL_CARD.md);
foreign formats come in through one importer each (model/import_*.py): Hugging Face GPT-2 and Llama-family folders,
and GGUF files. `load_checkpoint` tells them apart and names what it cannot serve."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import save_file

from model.checkpoint_files import (
    DTYPES,
    FORMAT,
    Checkpoint,
    CheckpointError,
    load_weights,
    read_json,
    read_safetensors,
    read_tokenizer,
    refuse_pickles,
    unique_state,
)
from model.config import TransformerConfig
from model.import_gguf import import_gguf
from model.import_gpt2 import export_gpt2, import_gpt2, is_gpt2_folder
from model.import_llama import import_llama, llama_family
from model.tokenizer import SpecialTokens, Tokenizer
from model.transformer import DecoderOnlyLM, Transformer, build_model


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
    tensors = {k: v.to(DTYPES[dtype]).contiguous().cpu() for k, v in unique_state(model).items()}
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save(path / "tokenizer.json")
    if card is not None:
        (path / "MODEL_CARD.md").write_text(card)
    return path


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Load one of our folders, a Hugging Face GPT-2 or Llama-family folder, or a GGUF file, in float32 on the
    CPU. Anything else is refused with a message naming the file and what it is."""
    folder = Path(path)
    if folder.is_file() and folder.suffix.lower() == ".gguf":
        return import_gguf(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: not a checkpoint folder")
    refuse_pickles(folder)  # before config.json, so a folder of pickled weights is named as such
    if is_gpt2_folder(folder):
        return import_gpt2(folder)
    meta = read_json(folder / "config.json")
    if "model_type" in meta or "architectures" in meta:  # a Hugging Face folder: ours, or a refusal naming it
        if not llama_family(meta):
            raise CheckpointError(f"config.json: architecture {_hf_architecture(meta)} is not served (served: "
                                  "GPT2LMHeadModel, LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM)")
        return import_llama(folder)
    if meta.get("format") != FORMAT or "architecture" not in meta:
        raise CheckpointError(f"config.json: not an {FORMAT} file (format={meta.get('format')!r})")
    try:
        cfg = TransformerConfig.from_dict(meta["architecture"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"config.json: invalid architecture ({e})") from e
    specials = SpecialTokens(**meta.get("special_tokens", {}))
    tokenizer = read_tokenizer(folder, specials)
    model = build_model(cfg)
    load_weights(model, read_safetensors(folder))
    if tokenizer.vocab_size > cfg.vocab_size:
        raise CheckpointError(
            f"tokenizer.json: {tokenizer.vocab_size} tokens but config.json has vocab_size {cfg.vocab_size}"
        )
    return Checkpoint(model.eval(), tokenizer, folder, "attnserve")


def _hf_architecture(meta: dict[str, object]) -> str:
    archs = meta.get("architectures")
    if isinstance(archs, list) and archs:
        return str(archs[0])
    return f"model_type {meta.get('model_type')!r}"


__all__ = ["DTYPES", "Checkpoint", "CheckpointError", "export_gpt2", "load_checkpoint", "save_checkpoint"]

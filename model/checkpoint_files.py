"""What every checkpoint loader shares: the loaded `Checkpoint`, its error, and safe readers for JSON,
safetensors (single or sharded) and tokenizer files. Weights are read only through safetensors or GGUF: nothing
is ever unpickled."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor, nn

from model.config import TransformerConfig
from model.tokenizer import SpecialTokens, Tokenizer
from model.transformer import DecoderOnlyLM, Transformer

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
    source_format: str  # "attnserve", "gpt2", "llama" (a Hugging Face Llama-family folder) or "gguf"
    chat_template: str | None = None  # carried by the weights file itself (GGUF); folders keep theirs on disk
    add_bos: bool = False  # the tokenizer puts BOS before a prompt (Llama 2, Llama 3); ours and GPT-2's do not

    @property
    def config(self) -> TransformerConfig:
        return self.model.config


def unique_state(model: nn.Module) -> dict[str, Tensor]:
    """State dict without the second name of tied parameters (safetensors stores each tensor once)."""
    seen: set[int] = set()
    out: dict[str, Tensor] = {}
    for name, t in model.state_dict(keep_vars=True).items():
        if id(t) in seen:
            continue
        seen.add(id(t))
        out[name] = t.detach()
    return out


def read_json(file: Path) -> dict[str, Any]:
    if not file.is_file():
        raise CheckpointError(f"{file.name}: missing in {file.parent.name}/")
    try:
        data = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file.name}: not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{file.name}: expected a JSON object")
    return data


def refuse_pickles(folder: Path) -> None:
    """Without model.safetensors, pickled weights are the likely mistake: name them rather than another file."""
    if (folder / "model.safetensors").is_file() or (folder / "model.safetensors.index.json").is_file():
        return
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise CheckpointError(
            f"{pickles[0]}: pickle-based weights are refused (loading them can run arbitrary code); "
            "convert them to model.safetensors"
        )


def read_safetensors(folder: Path) -> dict[str, Tensor]:
    """model.safetensors, or the shards model.safetensors.index.json names (Hugging Face's large checkpoints)."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(read_json(index).get("weight_map", {}).values()))
        if not shards:
            raise CheckpointError(f"{index.name}: no weight_map")
        return {k: v for shard in shards for k, v in _read_file(folder / shard).items()}
    file = folder / "model.safetensors"
    if not file.is_file():
        refuse_pickles(folder)
        raise CheckpointError(f"model.safetensors: missing in {folder.name}/")
    return _read_file(file)


def _read_file(file: Path) -> dict[str, Tensor]:
    if not file.is_file():
        raise CheckpointError(f"{file.name}: missing in {file.parent.name}/")
    try:
        with safe_open(str(file), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{file.name}: corrupt or not a safetensors file ({e})") from e


def load_weights(model: nn.Module, tensors: dict[str, Tensor], file: str = "model.safetensors") -> None:
    expected = unique_state(model)
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


def read_tokenizer(folder: Path, specials: SpecialTokens) -> Tokenizer:
    file = folder / "tokenizer.json"
    if not file.is_file():
        raise CheckpointError(f"tokenizer.json: missing in {folder.name}/")
    try:
        return Tokenizer.from_file(file, specials)
    except Exception as e:  # tokenizers raises plain Exception on malformed files
        raise CheckpointError(f"tokenizer.json: cannot be read ({e})") from e

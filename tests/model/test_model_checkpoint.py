"""Checkpoints: save -> load is exact, bf16 storage is close, and every broken folder is refused by name."""

from __future__ import annotations

import json
import pathlib
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from model.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from model.tokenizer import Tokenizer
from model.transformer import DecoderOnlyLM, Transformer

pytestmark = pytest.mark.usefixtures("one_thread")

Make = Callable[..., Transformer | DecoderOnlyLM]


def _logits(model: Transformer | DecoderOnlyLM) -> torch.Tensor:
    torch.manual_seed(0)
    tokens = torch.randint(0, model.config.vocab_size, (2, 9))
    with torch.no_grad():
        if isinstance(model, Transformer):
            return model(tokens, tokens.flip(1))
        return model(tokens)


@pytest.fixture
def saved(tmp_path: Path, gpt: DecoderOnlyLM, char_tokenizer: Tokenizer) -> Path:
    return save_checkpoint(gpt, char_tokenizer, tmp_path / "ckpt", card="# tiny\n")


@pytest.mark.parametrize("arch", ["decoder-only", "encoder-decoder"])
def test_save_load_is_bit_identical(tmp_path: Path, make: Make, char_tokenizer: Tokenizer, arch: str) -> None:
    model = make(arch, seed=1)
    folder = save_checkpoint(model, char_tokenizer, tmp_path / arch)
    assert {p.name for p in folder.iterdir()} == {"config.json", "model.safetensors", "tokenizer.json"}
    ck = load_checkpoint(folder)
    assert ck.source_format == "attnserve" and ck.config == model.config
    assert not ck.model.training, "a loaded model must be in eval mode"
    assert torch.equal(_logits(ck.model), _logits(model)), "float32 save -> load changed the logits"
    if model.config.tie_embeddings:
        assert ck.model.generator.weight is ck.model.tgt_embed.weight, "tied weights came back untied"
    text = "Speak, speak.\nÉtienne"
    assert ck.tokenizer.encode(text) == char_tokenizer.encode(text)
    assert (ck.tokenizer.pad_id, ck.tokenizer.bos_id, ck.tokenizer.eos_id) == (
        char_tokenizer.pad_id, char_tokenizer.bos_id, char_tokenizer.eos_id,
    )


def test_bf16_storage_loads_close(tmp_path: Path, gpt: DecoderOnlyLM, char_tokenizer: Tokenizer) -> None:
    folder = save_checkpoint(gpt, char_tokenizer, tmp_path / "bf16", dtype="bfloat16")
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        dtypes = {f.get_tensor(k).dtype for k in f.keys()}  # noqa: SIM118
    assert dtypes == {torch.bfloat16}, f"bf16 checkpoint stored {dtypes}"
    assert json.loads((folder / "config.json").read_text())["dtype"] == "bfloat16"
    ck = load_checkpoint(folder)
    assert next(ck.model.parameters()).dtype == torch.float32, "the loader serves float32"
    expected, got = _logits(gpt), _logits(ck.model)
    rel = ((got - expected).abs().max() / expected.abs().max()).item()
    assert 0 < rel < 0.02, f"bf16 storage: relative logit error {rel:.3g} (0 would mean nothing was rounded)"


@pytest.mark.parametrize("name", ["config.json", "model.safetensors", "tokenizer.json"])
def test_missing_file_is_named(saved: Path, name: str) -> None:
    (saved / name).unlink()
    with pytest.raises(CheckpointError, match=re.escape(f"{name}: missing")):
        load_checkpoint(saved)


@pytest.mark.parametrize("how", ["truncated", "garbage", "empty"])
def test_corrupt_safetensors_is_refused(saved: Path, how: str) -> None:
    file = saved / "model.safetensors"
    data = file.read_bytes()
    if how == "truncated":
        file.write_bytes(data[: len(data) // 2])
    elif how == "garbage":
        file.write_bytes(bytes((i * 37 + 11) % 256 for i in range(len(data))))
    else:
        file.write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"model\.safetensors: corrupt"):
        load_checkpoint(saved)


def test_weights_of_the_wrong_shape_are_refused(
    saved: Path, tmp_path: Path, make: Make, char_tokenizer: Tokenizer
) -> None:
    other = save_checkpoint(make("decoder-only", d_ff=48), char_tokenizer, tmp_path / "other")
    shutil.copy(other / "model.safetensors", saved / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"model\.safetensors: .*ffn\.w_1\.weight has shape \(48, 32\)"):
        load_checkpoint(saved)


def test_weights_of_another_architecture_are_refused(
    saved: Path, tmp_path: Path, make: Make, char_tokenizer: Tokenizer
) -> None:
    other = save_checkpoint(make("encoder-decoder"), char_tokenizer, tmp_path / "other")
    shutil.copy(other / "model.safetensors", saved / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"model\.safetensors: weights do not fit config\.json"):
        load_checkpoint(saved)


def test_non_finite_weights_are_refused(saved: Path) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(saved / "model.safetensors"))
    tensors["positions.weight"][0, 0] = float("nan")
    save_file(tensors, str(saved / "model.safetensors"))
    with pytest.raises(CheckpointError, match="NaN"):
        load_checkpoint(saved)


def test_tokenizer_larger_than_the_vocabulary_is_refused(tmp_path: Path, gpt: DecoderOnlyLM) -> None:
    big = Tokenizer.train_char("".join(chr(0x4E00 + i) for i in range(100)))
    folder = save_checkpoint(gpt, big, tmp_path / "big")
    with pytest.raises(CheckpointError, match=r"tokenizer\.json: 104 tokens but config\.json has vocab_size 64"):
        load_checkpoint(folder)


def test_wrong_format_config_is_refused(saved: Path) -> None:
    (saved / "config.json").write_text('{"format": "something-else/9"}')
    with pytest.raises(CheckpointError, match=r"config\.json: not an attnserve"):
        load_checkpoint(saved)
    (saved / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"config\.json: not valid JSON"):
        load_checkpoint(saved)


class _Payload:
    """Unpickling this creates a file: proof that a loader ran code from the pickle."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[object, ...]]:
        return (pathlib.Path.touch, (self.marker,))


@pytest.mark.parametrize("layout", ["only-pickle", "pickle-instead-of-safetensors"])
def test_pickle_weights_are_refused_and_never_unpickled(saved: Path, tmp_path: Path, layout: str) -> None:
    marker = tmp_path / "unpickled"
    folder = saved
    if layout == "only-pickle":
        folder = tmp_path / "pickled"
        folder.mkdir()
    else:
        (saved / "model.safetensors").unlink()
    torch.save({"weights": _Payload(marker)}, folder / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin: pickle") as err:
        load_checkpoint(folder)
    assert "refused" in str(err.value)
    assert not marker.exists(), "the loader unpickled the file"
    torch.load(folder / "pytorch_model.bin", weights_only=False)  # the payload is live: loading it does run
    assert marker.exists(), "test payload did not work, so the check above proves nothing"


def test_not_a_folder_is_refused(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not a checkpoint folder"):
        load_checkpoint(tmp_path / "nowhere")

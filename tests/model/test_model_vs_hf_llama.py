"""The Llama family against Hugging Face transformers (code we did not write): random tiny Llama, Qwen2 and
Mistral folders imported into our model give transformers' logits and greedy tokens; SmolLM2's GGUF file gives
transformers' logits for the same file; the GGUF and a folder of the same weights load to the same model; an
architecture we do not serve is refused by name."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch

from model.checkpoint import CheckpointError, load_checkpoint
from model.generate import GenerationConfig, generate
from model.tokenizer import Tokenizer

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.usefixtures("one_thread")

TOL = 1e-4
TEXTS = ["First Citizen:\nBefore we proceed", "Speak, speak.", "All: hear me"]
CORPUS = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n" * 4
SMALL = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=128, rms_norm_eps=1e-6, rope_theta=500.0)
LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 16}
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "llama-gqa": ("LlamaConfig", dict(num_key_value_heads=2)),
    "llama-mqa-tied": ("LlamaConfig", dict(num_key_value_heads=1, tie_word_embeddings=True)),
    "llama3-rope-scaling": ("LlamaConfig", dict(num_key_value_heads=2, rope_scaling=LLAMA3_SCALING)),
    "qwen2-qkv-bias": ("Qwen2Config", dict(num_key_value_heads=2, tie_word_embeddings=False)),
    "mistral": ("MistralConfig", dict(num_key_value_heads=2, sliding_window=None)),
}
CAUSAL_LM = {"LlamaConfig": "LlamaForCausalLM", "Qwen2Config": "Qwen2ForCausalLM",
             "MistralConfig": "MistralForCausalLM"}


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.train_bpe([CORPUS], vocab_size=300)


def hf_folder(root: Path, variant: str, tokenizer: Tokenizer) -> tuple[Path, Any]:
    """A random-weight transformers model of the variant, saved as a Hugging Face folder (safetensors)."""
    config_cls, extra = VARIANTS[variant]
    cfg = getattr(transformers, config_cls)(vocab_size=tokenizer.vocab_size, **{**SMALL, **extra},
                                           bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id)
    torch.manual_seed(0)
    hf = getattr(transformers, CAUSAL_LM[config_cls])(cfg).eval()
    if variant == "qwen2-qkv-bias":  # transformers initializes biases to 0: make them matter
        with torch.no_grad():
            for name, p in hf.named_parameters():
                if name.endswith("bias"):
                    p.normal_(std=0.5)
    folder = root / variant
    hf.save_pretrained(folder)
    tokenizer.save(folder / "tokenizer.json")
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    return folder, hf


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_folder_import_gives_transformers_logits_and_greedy_tokens(tmp_path: Path, tokenizer: Tokenizer,
                                                                  variant: str) -> None:
    folder, hf = hf_folder(tmp_path, variant, tokenizer)
    ckpt = load_checkpoint(folder)
    assert ckpt.source_format == "llama" and ckpt.config.kv_heads == hf.config.num_key_value_heads
    with torch.no_grad():
        for text in TEXTS:
            ids = torch.tensor([tokenizer.encode(text)])
            diff = (ckpt.model(ids) - hf(ids).logits).abs().max().item()
            assert diff <= TOL, f"{variant}: logits differ from transformers by {diff:.3g} on {text!r}"
        prompt = tokenizer.encode(TEXTS[0])
        theirs = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=24, min_new_tokens=24,
                             pad_token_id=tokenizer.eos_id)[0, len(prompt):].tolist()
    ours = generate(ckpt.model, prompt, GenerationConfig(max_new_tokens=24, eos_id=None))
    assert ours == theirs, f"{variant}: greedy tokens differ from transformers' generate"


def test_smollm2_gguf_gives_transformers_logits(smollm2_gguf: Path) -> None:
    ckpt = load_checkpoint(smollm2_gguf)
    cfg = ckpt.config
    assert (cfg.n_decoder_layers, cfg.d_model, cfg.h, cfg.kv_heads, cfg.d_ff) == (30, 576, 9, 3, 1536)
    assert (cfg.norm_kind, cfg.positional, cfg.ffn, cfg.rope_theta, cfg.tie_embeddings) == (
        "rmsnorm", "rotary", "gated", 100000.0, True)
    assert ckpt.chat_template is not None and "<|im_start|>" in ckpt.chat_template
    assert ckpt.tokenizer.eos_id == 2 and ckpt.tokenizer.token_text(2) == "<|im_end|>"
    hf = transformers.AutoModelForCausalLM.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name,
                                                           dtype=torch.float32).eval()
    prompts = ["The capital of France is", "def fibonacci(n):\n    ", "<|im_start|>user\nHi!<|im_end|>\n",
               "Once upon a time, in a land far away, there lived 12345 small dragons."]
    with torch.no_grad():
        for text in prompts:
            ids = torch.tensor([ckpt.tokenizer.encode(text)])
            diff = (ckpt.model(ids) - hf(ids).logits).abs().max().item()
            assert diff <= TOL, f"SmolLM2 logits differ from transformers by {diff:.3g} on {text!r}"


def test_gguf_and_folder_of_the_same_weights_load_to_the_same_model(tmp_path: Path, smollm2_gguf: Path) -> None:
    """transformers writes the GGUF's weights as a Hugging Face folder; our two importers must agree on it."""
    hf = transformers.AutoModelForCausalLM.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name,
                                                           dtype=torch.float32)
    tok = transformers.AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)
    folder = tmp_path / "smollm2-folder"
    plain = {k: v for k, v in hf.config.to_dict().items() if k != "quantization_config"}  # GGUF-loaded: unsaveable
    copy = transformers.LlamaForCausalLM(transformers.LlamaConfig.from_dict(plain))
    copy.load_state_dict(hf.state_dict())
    copy.save_pretrained(folder)
    tok.save_pretrained(folder)
    del hf, copy
    from_gguf, from_folder = load_checkpoint(smollm2_gguf), load_checkpoint(folder)
    assert from_folder.source_format == "llama" and from_folder.config == from_gguf.config
    text = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    ids = from_gguf.tokenizer.encode(text)
    assert from_folder.tokenizer.encode(text) == ids
    with torch.no_grad():
        a, b = from_gguf.model(torch.tensor([ids])), from_folder.model(torch.tensor([ids]))
    assert (a - b).abs().max().item() == 0.0


def test_an_architecture_we_do_not_serve_is_refused_by_name(tmp_path: Path) -> None:
    folder = tmp_path / "neox"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "gpt_neox",
                                                    "architectures": ["GPTNeoXForCausalLM"]}))
    with pytest.raises(CheckpointError, match="GPTNeoXForCausalLM is not served"):
        load_checkpoint(folder)
    gguf = pytest.importorskip("gguf")
    file = tmp_path / "phi.gguf"
    writer = gguf.GGUFWriter(str(file), "phi2")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", torch.zeros(4, 8).numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(CheckpointError, match="architecture 'phi2' is not served"):
        load_checkpoint(file)


def test_what_a_llama_folder_asks_beyond_us_is_refused_by_name(tmp_path: Path, tokenizer: Tokenizer) -> None:
    folder, _ = hf_folder(tmp_path, "llama-gqa", tokenizer)
    cfg = json.loads((folder / "config.json").read_text())
    for key, value, message in [("hidden_act", "gelu", "hidden_act 'gelu'"), ("mlp_bias", True, "mlp_bias"),
                                ("head_dim", 8, "head_dim 8")]:
        (folder / "config.json").write_text(json.dumps({**cfg, key: value}))
        with pytest.raises(CheckpointError, match=message):
            load_checkpoint(folder)

"""The models the benchmark serves, made here when they are not shipped; only SmolLM2 is downloaded (once).

- shakespeare-gpt: the shipped checkpoint when it exists; otherwise random weights of the same shape
  (preset "gpt-char") with a 65-character tokenizer like Tiny Shakespeare's.
- gpt-char: random weights of the same "gpt-char" preset (6 layers, d_model 384, ~11M parameters) and
  tokenizer: the issue's small GPT-2 shape, served whether or not a trained checkpoint ships.
- gpt2-small: random weights of GPT-2 124M's shape (preset "gpt2-small") with a byte-level BPE of exactly
  GPT-2's 50,257 tokens: the 256 byte symbols, 50,000 merges (every pair of printable ASCII characters, then
  pair + character) and <|endoftext|> last. A BPE trained on a small built-in text cannot reach 50,257 tokens,
  and a smaller tokenizer under a 50,257-row embedding would let random weights sample ids that decode to
  nothing; this one has every id decode to text, so the streams look like GPT-2's (one short piece per token)
  and the compute (embedding, 12 layers, 50,257-wide LM head) is GPT-2 small's exactly.
- smollm2-135m: the real SmolLM2-135M-Instruct, `model.fetch.fetch("smollm2")`'s GGUF file (Q4_1, which the
  server dequantizes to float32 on load), served under the file's stem.

The GPT-2-shaped ones are exported to the Hugging Face GPT-2 format (`export_gpt2`) for the transformers
baselines; SmolLM2 to a Hugging Face Llama folder of the same dequantized weights (`export_hf`)."""

from __future__ import annotations

import itertools
import json
import string
from pathlib import Path

import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers

from model.checkpoint import export_gpt2, load_checkpoint, save_checkpoint
from model.config import TransformerConfig, preset
from model.fetch import fetch
from model.tokenizer import SpecialTokens, Tokenizer
from model.transformer import build_model

SHIPPED = Path(__file__).resolve().parent.parent / "model" / "checkpoints"
SHAKESPEARE_CHARS = "\n !$&',-.3:;?" + string.ascii_uppercase + string.ascii_lowercase  # Tiny Shakespeare's 65
ENDOFTEXT = "<|endoftext|>"
SMOLLM2 = "smollm2-135m"
MODELS = ("shakespeare-gpt", "gpt-char", "gpt2-small", SMOLLM2)


def gpt2_sized_bpe(vocab_size: int = 50257) -> Tokenizer:
    """A byte-level BPE with exactly `vocab_size` tokens, built from rules rather than trained."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()  # the 256 byte symbols; printable ASCII maps to itself
    base = sorted(alphabet, key=lambda c: (ord(c) > 126, ord(c)))
    printable = [c for c in string.printable[:94]]  # digits, letters, punctuation: no whitespace
    vocab = {c: i for i, c in enumerate(base)}
    merges: list[tuple[str, str]] = []
    wanted = vocab_size - len(vocab) - 1
    pairs = [(a, b) for a, b in itertools.product(printable, printable)]
    triples = ((a + b, c) for a, b in pairs for c in printable)
    for left, right in itertools.chain(pairs, triples):
        if len(merges) == wanted:
            break
        merges.append((left, right))
        vocab[left + right] = len(vocab)
    vocab[ENDOFTEXT] = len(vocab)
    tok = HFTokenizer(models.BPE(vocab, merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([ENDOFTEXT])
    return Tokenizer(tok, SpecialTokens(bos=ENDOFTEXT, eos=ENDOFTEXT, pad=None, unk=None))


def _fresh(folder: Path) -> bool:
    return (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()


def make_model(name: str, root: Path, seed: int = 0, progress: bool = False) -> Path:
    """Our checkpoint folder for `name` (the shipped one, or random weights made once under root), or SmolLM2's
    GGUF file from the fetch cache (downloaded on the first call; model.fetch.FetchError when it cannot be)."""
    if name == SMOLLM2:
        return fetch("smollm2", progress=progress)
    if name == "shakespeare-gpt" and _fresh(SHIPPED / name):
        return SHIPPED / name
    folder = root / name
    if _fresh(folder):
        return folder
    torch.manual_seed(seed)
    if name in ("shakespeare-gpt", "gpt-char"):
        tok = Tokenizer.train_char(SHAKESPEARE_CHARS)
        cfg = preset("gpt-char", vocab_size=tok.vocab_size)
    elif name == "gpt2-small":
        tok = gpt2_sized_bpe()
        cfg = preset("gpt2-small", vocab_size=tok.vocab_size)
    else:
        raise KeyError(f"unknown benchmark model {name!r}; known: {', '.join(MODELS)}")
    card = f"# {name} (random weights)\n\nMade by the serving benchmark: {cfg.arch}, the shape of `{name}`.\n"
    return save_checkpoint(build_model(cfg), tok, folder, card=card)


def is_gguf(checkpoint: Path) -> bool:
    return checkpoint.is_file() and checkpoint.suffix.lower() == ".gguf"


def served_name(checkpoint: Path) -> str:
    """The name the server serves a checkpoint under (service.registry.model_name): a GGUF file's stem."""
    return checkpoint.stem if is_gguf(checkpoint) else checkpoint.name


def model_config(checkpoint: Path) -> TransformerConfig:
    """A checkpoint's architecture without loading its weights (a GGUF file's metadata, or our config.json)."""
    if is_gguf(checkpoint):
        from gguf import GGUFReader

        from model.import_gguf import _fields, gguf_config

        reader = GGUFReader(str(checkpoint))
        return gguf_config(_fields(reader), {t.name for t in reader.tensors}, checkpoint.name)
    return TransformerConfig.from_dict(json.loads((checkpoint / "config.json").read_text())["architecture"])


def export_hf(checkpoint: Path, root: Path) -> Path:
    """The checkpoint's weights as a Hugging Face folder under root, made once per source: a GPT-2 folder for
    ours, a Llama folder for a GGUF file (transformers' own dequantization of it, saved in float32)."""
    gguf = is_gguf(checkpoint)
    folder = root / (f"{checkpoint.stem}-hf" if gguf else f"{checkpoint.name}-gpt2")
    stamp = folder / "SOURCE"
    weights = checkpoint if gguf else checkpoint / "model.safetensors"
    source = f"{checkpoint.resolve()} {weights.stat().st_mtime_ns}"
    if _fresh(folder) and stamp.is_file() and stamp.read_text() == source:
        return folder
    if gguf:
        _export_gguf(checkpoint, folder)
    else:
        ckpt = load_checkpoint(checkpoint)
        export_gpt2(ckpt.model, ckpt.tokenizer, folder)  # type: ignore[arg-type]
    stamp.write_text(source)
    return folder


def _export_gguf(file: Path, folder: Path) -> None:
    """transformers loads the GGUF dequantized (its Llama path has no packed kernels; checked), and the weights
    are saved as a plain folder, which loads in seconds where the GGUF takes ~25 s on 2 cores."""
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(file.parent, gguf_file=file.name, dtype=torch.float32)
    state = hf.state_dict()
    packed = sorted(k for k, v in state.items() if v.dtype != torch.float32)
    if packed:
        raise RuntimeError(f"transformers kept {file.name}'s weights packed ({packed[0]}, ...): not float32 weights")
    plain = {k: v for k, v in hf.config.to_dict().items() if k != "quantization_config"}  # GGUF-loaded: unsaveable
    copy = type(hf)(type(hf.config).from_dict(plain))
    copy.load_state_dict(state)
    copy.save_pretrained(folder)
    transformers.AutoTokenizer.from_pretrained(file.parent, gguf_file=file.name).save_pretrained(folder)

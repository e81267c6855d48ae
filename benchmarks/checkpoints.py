"""The models the benchmark serves, made here when they are not shipped: nothing is downloaded.

- shakespeare-gpt: the shipped checkpoint when it exists; otherwise random weights of the same shape
  (preset "gpt-char") with a 65-character tokenizer like Tiny Shakespeare's.
- gpt2-small: random weights of GPT-2 124M's shape (preset "gpt2-small") with a byte-level BPE of exactly
  GPT-2's 50,257 tokens: the 256 byte symbols, 50,000 merges (every pair of printable ASCII characters, then
  pair + character) and <|endoftext|> last. A BPE trained on a small built-in text cannot reach 50,257 tokens,
  and a smaller tokenizer under a 50,257-row embedding would let random weights sample ids that decode to
  nothing; this one has every id decode to text, so the streams look like GPT-2's (one short piece per token)
  and the compute (embedding, 12 layers, 50,257-wide LM head) is GPT-2 small's exactly.

Each is also exported to the Hugging Face GPT-2 format (`export_gpt2`) for the transformers baselines."""

from __future__ import annotations

import itertools
import string
from pathlib import Path

import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers

from model.checkpoint import export_gpt2, load_checkpoint, save_checkpoint
from model.config import preset
from model.tokenizer import SpecialTokens, Tokenizer
from model.transformer import build_model

SHIPPED = Path(__file__).resolve().parent.parent / "model" / "checkpoints"
SHAKESPEARE_CHARS = "\n !$&',-.3:;?" + string.ascii_uppercase + string.ascii_lowercase  # Tiny Shakespeare's 65
ENDOFTEXT = "<|endoftext|>"


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


def make_model(name: str, root: Path, seed: int = 0) -> Path:
    """Our checkpoint folder for `name` (the shipped one, or random weights made once under root)."""
    if name == "shakespeare-gpt" and _fresh(SHIPPED / name):
        return SHIPPED / name
    folder = root / name
    if _fresh(folder):
        return folder
    torch.manual_seed(seed)
    if name == "shakespeare-gpt":
        tok = Tokenizer.train_char(SHAKESPEARE_CHARS)
        cfg = preset("gpt-char", vocab_size=tok.vocab_size)
    elif name == "gpt2-small":
        tok = gpt2_sized_bpe()
        cfg = preset("gpt2-small", vocab_size=tok.vocab_size)
    else:
        raise KeyError(f"unknown benchmark model {name!r}; known: shakespeare-gpt, gpt2-small")
    card = f"# {name} (random weights)\n\nMade by the serving benchmark: {cfg.arch}, the shape of `{name}`.\n"
    return save_checkpoint(build_model(cfg), tok, folder, card=card)


def export_hf(checkpoint: Path, root: Path) -> Path:
    """The checkpoint's weights as a Hugging Face GPT-2 folder under root (made once per source folder)."""
    folder = root / f"{checkpoint.name}-gpt2"
    stamp = folder / "SOURCE"
    source = f"{checkpoint.resolve()} {(checkpoint / 'model.safetensors').stat().st_mtime_ns}"
    if _fresh(folder) and stamp.is_file() and stamp.read_text() == source:
        return folder
    ckpt = load_checkpoint(checkpoint)
    export_gpt2(ckpt.model, ckpt.tokenizer, folder)  # type: ignore[arg-type]
    stamp.write_text(source)
    return folder

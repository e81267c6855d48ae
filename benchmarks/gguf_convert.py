"""llama.cpp's `convert_hf_to_gguf.py`, run with two mends for the benchmark's GPT-2 folders; run by
benchmarks.llama_cpp.convert with llama.cpp's sources and their gguf-py first on PYTHONPATH:

    PYTHONPATH=<llama.cpp>/gguf-py:<llama.cpp> python -m benchmarks.gguf_convert FOLDER --outtype f32 --outfile F

- GPT-2: the converter reads `n_ctx` (our exported config.json names it `n_positions`, as transformers does) and
  writes a feed-forward size of 4 x n_embd; here the context is `n_ctx` or `n_positions` and the feed-forward
  size `n_inner` when the config gives one (shakespeare-gpt's and the test's tiny shapes).
- A tokenizer whose pre-tokenizer hash llama.cpp does not know (the random-weight checkpoints' rule-built
  BPE, a character vocabulary) is written with the GPT-2 pre-tokenizer instead of failing: the benchmark sends
  prompts as token ids, so llama.cpp never splits text with it.
- A folder with a tokenizer.json and no tokenizer_config.json (our GPT-2 exports) is read as that
  tokenizer.json (`PreTrainedTokenizerFast`): transformers' GPT2Tokenizer would append <|endoftext|> to a
  character vocabulary. A vocabulary that is not byte-level (characters) is spelled in GPT-2's byte alphabet,
  as llama.cpp's "gpt2" tokenizer model decodes it, and gets one merge of two NUL bytes (the model has none;
  llama.cpp refuses a BPE vocabulary without merges). Token ids are unchanged.

- A folder without tokenizer.model (every one here) does not need sentencepiece installed: the converter imports
  it before it looks for that file, and falls back to the tokenizer.json on FileNotFoundError.

Nothing else changes: the weights are the converter's own (f32, f16 or q8_0)."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

log = logging.getLogger("gguf_convert")
TANH_GELU = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")
_PRINTABLE = [*range(33, 127), *range(161, 173), *range(174, 256)]  # GPT-2's bytes_to_unicode: these as themselves,
BYTE_ALPHABET = {b: chr(b) for b in _PRINTABLE} | {  # the other 68 bytes as U+0100 onwards, in byte order
    b: chr(256 + i) for i, b in enumerate(b for b in range(256) if b not in _PRINTABLE)}


def _byte_level(folder: Path) -> bool:
    tok = json.loads((folder / "tokenizer.json").read_text()) if (folder / "tokenizer.json").is_file() else {}
    return "ByteLevel" in json.dumps(tok.get("decoder")) or (folder / "merges.txt").is_file()


def _byte_spelling(text: str) -> str:
    """`text` in GPT-2's byte alphabet (each UTF-8 byte one printable character), as byte-level vocabularies are."""
    return "".join(BYTE_ALPHABET[b] for b in text.encode())


def patch() -> None:
    import gguf  # llama.cpp's gguf-py, from PYTHONPATH
    import transformers
    from conversion.base import TextModel  # llama.cpp's, from PYTHONPATH
    from conversion.gpt2 import GPT2Model

    auto = transformers.AutoTokenizer

    class AutoTokenizer:
        @staticmethod
        def from_pretrained(folder: Any, *args: Any, **kwargs: Any) -> Any:
            path = Path(folder)
            if (path / "tokenizer.json").is_file() and not (path / "tokenizer_config.json").is_file():
                return transformers.PreTrainedTokenizerFast(tokenizer_file=str(path / "tokenizer.json"))
            return auto.from_pretrained(folder, *args, **kwargs)

    transformers.AutoTokenizer = AutoTokenizer  # type: ignore[misc, assignment]  # imported inside the converter's functions

    vocab_base = TextModel.get_vocab_base

    def respelled(self: Any) -> tuple[list[str], list[int], str]:
        tokens, types, pre = vocab_base(self)
        if not _byte_level(Path(self.dir_model)):
            tokens = [_byte_spelling(t) if k == gguf.TokenType.NORMAL else t for t, k in zip(tokens, types, strict=True)]
        return tokens, types, pre

    add_to_gguf = gguf.SpecialVocab.add_to_gguf

    def with_a_merge(self: Any, gw: Any, quiet: bool = False) -> None:
        if self.load_merges and not self.merges:
            self.merges = [f"{_byte_spelling(chr(0))} {_byte_spelling(chr(0))}"]
        add_to_gguf(self, gw, quiet)

    sentencepiece_vocab = TextModel._create_vocab_sentencepiece

    def sentencepiece_file(self: Any) -> Any:  # the converter imports sentencepiece before it looks for the file
        if not (Path(self.dir_model) / "tokenizer.model").is_file():
            raise FileNotFoundError(f"File not found: {Path(self.dir_model) / 'tokenizer.model'}")
        return sentencepiece_vocab(self)

    TextModel._create_vocab_sentencepiece = sentencepiece_file
    TextModel.get_vocab_base = respelled
    gguf.SpecialVocab.add_to_gguf = with_a_merge  # type: ignore[method-assign]
    recognised = TextModel.get_vocab_base_pre

    def vocab_pre(self: Any, tokenizer: Any) -> str:
        try:
            return str(recognised(self, tokenizer))
        except NotImplementedError:
            log.warning("pre-tokenizer not recognised: writing 'gpt-2' (prompts go to llama.cpp as token ids)")
            return "gpt-2"

    def gpt2_parameters(self: Any) -> None:
        h, w = self.hparams, self.gguf_writer
        if h.get("activation_function", "gelu_new") not in TANH_GELU:
            log.warning("activation %s: llama.cpp's GPT-2 graph computes the tanh GELU",
                        h.get("activation_function"))
        w.add_block_count(self.block_count)
        w.add_context_length(h.get("n_ctx") or h["n_positions"])
        w.add_embedding_length(h["n_embd"])
        w.add_feed_forward_length(h.get("n_inner") or 4 * h["n_embd"])
        w.add_head_count(h["n_head"])
        w.add_layer_norm_eps(h["layer_norm_epsilon"])
        w.add_file_type(self.ftype)

    TextModel.get_vocab_base_pre = vocab_pre
    GPT2Model.set_gguf_parameters = gpt2_parameters


def main() -> None:
    import convert_hf_to_gguf  # llama.cpp's, from PYTHONPATH

    patch()
    sys.argv = ["convert_hf_to_gguf.py", *sys.argv[1:]]
    convert_hf_to_gguf.main()


if __name__ == "__main__":
    main()

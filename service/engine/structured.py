"""Structured output: a request's Constraint compiled by xgrammar into a grammar over the model's vocabulary,
held as a matcher that masks each step's logits and advances on the tokens the request accepts.

xgrammar rather than llguidance (both are well kept, both give CPU token masks from Hugging Face tokenizers):
it is vLLM's default, it reads our character-level tokenizer (llguidance's loader refuses its decoder), and on
SmolLM2 a JSON schema compiles in ~10 ms and masks a step in well under a millisecond (benchmarks/NOTES.md).
Grammars are compiled on a worker thread, off the engine's step loop, and cached per (model, constraint); a
constraint that does not compile, or that a character-level vocabulary cannot spell, is refused before the
request is queued (ConstraintError, a 400)."""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import xgrammar as xgr
from torch import Tensor
from transformers import PreTrainedTokenizerFast

from service.engine.alphabet import Alphabet, Vocabulary
from service.engine.request import Constraint, InvalidRequest, Request

KINDS = ("json", "json_object", "regex", "choice", "grammar")
CACHE_SIZE = 256  # compiled grammars kept per model
# xgrammar 0.2.9 writes a length-bounded JSON string's characters as [^"\\\r\n], which lets raw control characters
# (a tab, \x1d) into strings that JSON parsers refuse; its unbounded strings exclude \0-\x1f as JSON says.
_STRING_CHARACTER = (r'[^\"\\\r\n]', r'[^\0-\x1f\"\\]')
_LOCATION = re.compile(r"^\[[\d:]+\] \S+?:\d+: ")  # xgrammar's "[12:00:00] /path/file.cc:123: " prefix


class ConstraintError(InvalidRequest):
    """A constraint that does not compile, or that the model's vocabulary cannot produce."""


def tokenizer_info(tok: Vocabulary, vocab_size: int) -> xgr.TokenizerInfo:
    """The vocabulary as xgrammar reads it. Special tokens (and ids past the tokenizer's vocabulary) are given
    no text, so that no grammar can choose them: a character-level vocabulary's "<s>" is one token, not the
    three characters a grammar could ask for. EOS is the stop token a completed grammar allows."""
    hf = tok.tok
    specials = tok.special_ids | {i for i, t in hf.get_added_tokens_decoder().items() if t.special}
    vocab = [("" if i in specials else hf.id_to_token(i) or "") for i in range(vocab_size)]
    stops = [tok.eos_id] if tok.eos_id is not None else []
    detected = xgr.TokenizerInfo.from_huggingface(PreTrainedTokenizerFast(tokenizer_object=hf),
                                                  vocab_size=vocab_size, stop_token_ids=stops)
    return xgr.TokenizerInfo(vocab, detected.vocab_type, vocab_size=vocab_size, stop_token_ids=stops,
                             add_prefix_space=detected.add_prefix_space)


def choice_grammar(choices: list[str]) -> str:
    """One of the strings, exactly: an EBNF alternation of JSON-escaped literals (xgrammar reads the escapes)."""
    return "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)


class Grammars:
    """One model's grammar compiler: compiles constraints on a worker thread, caches them, makes matchers."""

    def __init__(self, tok: Vocabulary, vocab_size: int, threads: int = 2) -> None:
        self.info = tokenizer_info(tok, vocab_size)
        self.compiler = xgr.GrammarCompiler(self.info, max_threads=threads)
        self.alphabet = Alphabet.of(tok, vocab_size, self.info)  # None for byte-complete vocabularies
        self._cache: OrderedDict[Constraint, xgr.CompiledGrammar] = OrderedDict()
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="grammar")
        self.compile_seconds: list[float] = []  # each compilation's time (not cache hits), for benchmarks

    async def compile(self, c: Constraint) -> xgr.CompiledGrammar:
        """The compiled grammar, from the cache or compiled on the worker thread (the engine keeps stepping)."""
        hit = self._hit(c)
        if hit is not None:
            return hit
        return await asyncio.get_running_loop().run_in_executor(self._pool, self.compile_now, c)

    def cached(self, c: Constraint) -> xgr.CompiledGrammar:
        """The compiled grammar, from the cache or compiled here and now (a core process's loop)."""
        hit = self._hit(c)
        return hit if hit is not None else self.compile_now(c)

    def _hit(self, c: Constraint) -> xgr.CompiledGrammar | None:
        with self._lock:
            hit = self._cache.get(c)
            if hit is not None:
                self._cache.move_to_end(c)
            return hit

    def compile_now(self, c: Constraint) -> xgr.CompiledGrammar:
        t = time.perf_counter()
        try:
            compiled = self._compile(c, self.compiler)
        except RuntimeError as e:  # xgrammar reports a bad schema, regex or grammar as a RuntimeError
            message = _LOCATION.sub("", str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__)
            raise ConstraintError(f"the {_NAMES[c.kind]} does not compile: {message}") from e
        if self.alphabet is not None:
            missing = self.alphabet.missing(self._compile(c, self.alphabet.compiler))
            if missing:
                raise ConstraintError(self.alphabet.explain(missing, _NAMES[c.kind]))
        self.compile_seconds.append(time.perf_counter() - t)
        with self._lock:
            self._cache[c] = compiled
            while len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
        return compiled

    @staticmethod
    def _compile(c: Constraint, compiler: xgr.GrammarCompiler) -> xgr.CompiledGrammar:
        if c.kind in ("json", "json_object"):
            schema = c.spec if c.kind == "json" else '{"type": "object"}'
            grammar = xgr.Grammar.from_json_schema(schema, any_whitespace=c.any_whitespace, strict_mode=True)
            return compiler.compile_grammar(str(grammar).replace(*_STRING_CHARACTER))
        if c.kind == "regex":
            return compiler.compile_regex(c.spec)
        if c.kind == "choice":
            return compiler.compile_grammar(choice_grammar(json.loads(c.spec)))
        if c.kind == "grammar":
            return compiler.compile_grammar(c.spec)
        raise ConstraintError(f"unknown constraint kind {c.kind!r}; one of {', '.join(KINDS)}")

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def matcher(compiled: xgr.CompiledGrammar, has_eos: bool) -> xgr.GrammarMatcher:
    """One request's state in a compiled grammar. Without an EOS the grammar ends the output as soon as it may
    (nothing else could end it)."""
    return xgr.GrammarMatcher(compiled, terminate_without_stop_token=not has_eos)


_NAMES = {"json": "JSON schema", "json_object": "JSON object format", "regex": "regex", "choice": "choice",
          "grammar": "grammar"}


# --- the step's side (engine thread) ----------------------------------------------------------------------------

class TokenMasks:
    """The step's grammar masks: one bitmask row per sampled request, filled on the host for the rows that carry
    a matcher (into the step's input buffer, so that its copy to the device is the step's one copy), applied to
    their logits before temperature, top-k and top-p."""

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size
        self._batch = xgr.BatchGrammarMatcher(max_threads=1)

    def fill(self, reqs: list[Request], host: Tensor) -> tuple[list[int], set[int]]:
        """Fill host[j] for each request j with a matcher: (those rows, the rows whose mask allows nothing)."""
        rows = [j for j, r in enumerate(reqs) if r.matcher is not None]
        if rows:
            self._batch.batch_fill_next_token_bitmask([reqs[j].matcher for j in rows], host, rows)
        return rows, {j for j in rows if not np.any(host[j].numpy())}

    def apply(self, logits: Tensor, mask: Tensor, rows: list[int]) -> None:
        """Disallowed tokens of the masked rows to -inf, in place (mask: (>= len(logits), words) on the device)."""
        xgr.apply_token_bitmask_inplace(logits, mask[: logits.size(0)], vocab_size=min(self.vocab_size, logits.size(1)),
                                        indices=rows)

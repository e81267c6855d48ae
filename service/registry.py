"""The served models: load each checkpoint, place it on the device, give it an engine, describe it."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from model.checkpoint import Checkpoint, CheckpointError, load_checkpoint
from model.config import TransformerConfig
from model.paged_cache import BlockPool
from model.tokenizer import Tokenizer
from model.transformer import DecoderOnlyLM, Transformer, num_parameters
from service.caller import CALLER
from service.engine.client import EngineCoreClient
from service.engine.device import pick_device, pick_dtype, pick_kv_dtype
from service.engine.engine import Engine, EngineConfig, RequestStats, RequestStream, StepStats
from service.engine.request import Constraint, Request, SamplingParams
from service.engine.runner import ModelRunner
from service.settings import Settings

log = logging.getLogger("attnserve.registry")
MIN_CONTEXT = 512  # the default context is never cut below this (a chat needs room), nor above the model's

@dataclass
class ServedModel:
    """One model as the HTTP layer sees it: name, tokenizer, engine and a description."""

    name: str
    checkpoint: Checkpoint
    engine: Engine | EngineCoreClient  # in this process, or a client of its core process
    device: str
    dtype: torch.dtype
    quantization: str = "none"
    parameters: int = 0
    kv_cache_dtype: str = "auto"  # the setting (`kv_dtype`: what it picked)
    _grammars: asyncio.Future[Any] | None = field(default=None, repr=False)

    async def grammar(self, constraint: Constraint | None) -> Any:
        """The compiled grammar of a constraint (None for none), compiled off the event loop and cached
        (service/engine/structured.py); ConstraintError when it does not compile or cannot be satisfied."""
        if constraint is None:
            return None
        if self._grammars is None:  # the first constrained request reads the vocabulary into xgrammar
            self._grammars = asyncio.ensure_future(asyncio.to_thread(self._new_grammars))
        grammars = await asyncio.shield(self._grammars)
        return await grammars.compile(constraint)

    def _new_grammars(self) -> Any:
        from service.engine.structured import Grammars  # xgrammar loads with the first constrained request

        return Grammars(self.tokenizer, self.checkpoint.config.vocab_size)

    @property
    def tokenizer(self) -> Tokenizer:
        return self.checkpoint.tokenizer

    @property
    def model(self) -> Transformer | DecoderOnlyLM:
        """The network an in-process engine runs (tests look inside it; a core process holds its own)."""
        if isinstance(self.engine, EngineCoreClient):
            raise AttributeError(f"model {self.name} runs in its engine process")
        return self.engine.runner.model

    @property
    def is_encoder_decoder(self) -> bool:
        return self.checkpoint.config.is_encoder_decoder

    @property
    def context_length(self) -> int:
        return self.engine.config.max_model_len

    def default_max_tokens(self, prompt_ids: list[int]) -> int | None:
        """A translator's max_tokens when a request gives none: sized to the source (2 x its tokens + 10), within
        the decoder's room after BOS. None for an LM: the schema's default applies."""
        if not self.is_encoder_decoder:
            return None
        return max(1, min(2 * len(prompt_ids) + 10, self.context_length - 1))

    def open(self, req: Request, counts_prompt: bool = True) -> RequestStream:
        """Queue req on this model's engine for the current HTTP caller: the request inherits the caller's
        deadline, and its tokens reach the caller's access-log line when its stream closes (its prompt only
        if `counts_prompt`: the n choices of one prompt count it once, as usage does)."""
        caller = CALLER.get()
        if caller is not None and req.deadline is None:
            req.deadline = caller.deadline
        stream = self.engine.open(req)
        if caller is not None and req.counted:
            stream.on_close = lambda s: caller.count(s.request.num_prompt_tokens if counts_prompt else 0,
                                                     s.num_output_tokens)
        return stream

    def make_request(self, request_id: str, text: str | None, params: SamplingParams,
                     prompt_ids: list[int] | None = None, grammar: Any = None) -> Request:
        """A translator gets the text as its source and starts decoding from BOS; an LM continues the text.
        `grammar` (from `grammar()`) holds the output to params.constraint: the request gets its own matcher."""
        req = self._request(request_id, text, params, prompt_ids)
        if grammar is not None:
            from service.engine.structured import matcher

            req.matcher = matcher(grammar, self.tokenizer.eos_id is not None)
        return req

    def _request(self, request_id: str, text: str | None, params: SamplingParams,
                 prompt_ids: list[int] | None) -> Request:
        tok = self.tokenizer
        ids = prompt_ids if prompt_ids is not None else tok.encode(text or "", add_bos=self.checkpoint.add_bos)
        if self.is_encoder_decoder:
            bos = tok.bos_id if tok.bos_id is not None else 0
            return Request(request_id, [bos], params, source_ids=ids)
        if not ids:
            ids = [tok.bos_id if tok.bos_id is not None else (tok.eos_id or 0)]
        return Request(request_id, ids, params)

    @property
    def kv_dtype(self) -> torch.dtype:
        return pick_kv_dtype(self.kv_cache_dtype, self.dtype, self.quantization)

    def describe(self) -> dict[str, Any]:
        cfg = self.checkpoint.config
        return {
            "architecture": cfg.arch,
            "format": self.checkpoint.source_format,
            "parameters": self.parameters,
            "d_model": cfg.d_model,
            "heads": cfg.h,
            "kv_heads": cfg.kv_heads,  # < heads: grouped-query attention (query heads share K/V heads)
            "kv_bytes_per_token": BlockPool.bytes_per_block(cfg, 1, self.kv_dtype),
            "kv_cache_dtype": str(self.kv_dtype).removeprefix("torch."),
            "encoder_layers": cfg.n_encoder_layers if cfg.is_encoder_decoder else 0,
            "decoder_layers": cfg.n_decoder_layers,
            "vocab_size": cfg.vocab_size,
            "context_length": self.context_length,
            "dtype": str(self.dtype).removeprefix("torch."),
            "quantization": self.quantization,
            "device": self.device,
            "kv_blocks": self.engine.num_blocks,
            "block_size": self.engine.block_size,
            "prefix_caching": self.engine.prefix_caching,
        }


def discover(settings: Settings) -> list[Path]:
    """Checkpoints: every folder with a config.json and every .gguf file under models_dir, then the explicit ones."""
    found: list[Path] = []
    if settings.models_dir is not None and settings.models_dir.is_dir():
        found += sorted(p for p in settings.models_dir.iterdir()
                        if (p / "config.json").is_file() or (p.is_file() and p.suffix.lower() == ".gguf"))
    found += [Path(p) for p in settings.models]
    return found


def model_name(path: Path) -> str:
    """A folder serves under its name, a GGUF file under its name without the suffix."""
    return path.stem if path.is_file() and path.suffix.lower() == ".gguf" else path.name


def context_length(cfg: TransformerConfig, settings: Settings, kv_tokens: int) -> int:
    """The longest request served (vLLM's --max-model-len): the setting (capped to each model's own context), else
    the model's context capped to what the KV budget holds for max_num_seqs sequences (in whole blocks, never below
    MIN_CONTEXT), so that max_num_seqs requests of that length fit at once. Blocks are taken as tokens arrive
    (model/paged_cache.py); the setting may go up to the whole pool, and requests then wait or are preempted."""
    if cfg.is_encoder_decoder:
        return min(cfg.max_len, settings.max_model_len or cfg.max_len)
    if settings.max_model_len is not None:  # one setting for every served model: a cap on each one's context
        if min(settings.max_model_len, cfg.max_len) > kv_tokens:
            raise CheckpointError(f"--max-model-len {settings.max_model_len} does not fit the KV cache "
                                  f"({kv_tokens} tokens; raise --kv-cache-bytes or --kv-cache-blocks)")
        return min(settings.max_model_len, cfg.max_len)
    fair = kv_tokens // max(1, settings.max_num_seqs) // settings.block_size * settings.block_size
    return min(cfg.max_len, max(fair, MIN_CONTEXT))


def build_served_model(
    path: Path,
    settings: Settings,
    on_step: Any = None,
    on_finish: Any = None,
) -> ServedModel:
    """Load a checkpoint and give it an engine with a KV pool sized by the settings."""
    ckpt = load_checkpoint(path)
    device = pick_device(settings.device)
    dtype = pick_dtype(settings.dtype, device, ckpt.config.d_model)
    cfg = ckpt.config
    kv_dtype = pick_kv_dtype(settings.kv_cache_dtype, dtype, settings.quantization)
    per_block = BlockPool.bytes_per_block(cfg, settings.block_size, kv_dtype)
    num_blocks = settings.kv_cache_blocks or max(1, settings.kv_cache_bytes // per_block)
    max_model_len = context_length(cfg, settings, num_blocks * settings.block_size)
    if max_model_len < cfg.max_len:
        log.info("context capped", extra={"model": model_name(path), "max_model_len": max_model_len,
                                          "model_context": cfg.max_len})
    runner = ModelRunner(ckpt.model, num_blocks, settings.max_num_seqs, max_model_len, settings.block_size, device,
                         dtype, max(settings.max_num_batched_tokens, settings.max_num_seqs), settings.enforce_eager,
                         quantization=settings.quantization, kv_dtype=kv_dtype)
    config = EngineConfig(
        num_blocks=num_blocks,
        block_size=settings.block_size,
        max_num_seqs=settings.max_num_seqs,
        max_num_batched_tokens=settings.max_num_batched_tokens,
        max_waiting_requests=settings.max_waiting_requests,
        max_waiting_tokens=settings.max_waiting_tokens,
        queue_timeout=settings.queue_timeout,
        max_model_len=max_model_len,
        enable_prefix_caching=settings.enable_prefix_caching,
        max_stream_backlog=settings.max_stream_backlog,
        num_scheduler_steps=settings.num_scheduler_steps,
        max_burst_s=settings.max_burst_ms / 1000,
    )
    tok = ckpt.tokenizer
    name = model_name(path)
    engine = Engine(name, runner, config, tok.decode, tok.eos_id, on_step, on_finish)
    return ServedModel(name, ckpt, engine, device, dtype, settings.quantization, num_parameters(ckpt.model),
                       kv_cache_dtype=settings.kv_cache_dtype)


def warm_up(served: ServedModel) -> None:
    """A few real steps before serving, so that the first user does not pay for lazy initialisation."""
    tok = served.tokenizer
    probe = tok.encode("The ") or [0]
    served.engine.warmup(probe if not served.is_encoder_decoder else [tok.bos_id or 0],
                         probe if served.is_encoder_decoder else None)


__all__ = ["RequestStats", "ServedModel", "StepStats", "build_served_model", "discover", "warm_up"]

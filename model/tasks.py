"""The training tasks behind one small interface (`Task`): language modelling on a text and translation on
parallel sentences. A task owns its data, its model configuration, its batches and its validation loss."""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from model.config import TransformerConfig
from model.data import CharLMData, TranslationBatch, TranslationData, read_parallel
from model.recipe import smoothed_losses
from model.tokenizer import Tokenizer
from model.train_config import TrainConfig
from model.train_state import StatefulTask

Autocast = AbstractContextManager[Any]


@dataclass
class Step:
    """One training batch's outcome, left on the device: the loop reads it at the log interval only."""

    loss: Tensor  # what is minimized
    nll: Tensor  # plain per-token NLL (for logs), detached
    tokens: int  # target tokens in the batch (counted on the host, before the copy to the device)


class Task(StatefulTask, Protocol):
    """What the loop needs from a task (and, from StatefulTask, what survives a resume)."""

    tokenizer: Tokenizer

    def model_config(self) -> TransformerConfig: ...
    def train_step(self, model: nn.Module, device: torch.device, autocast: Autocast) -> Step: ...
    def evaluate(self, model: nn.Module, device: torch.device, autocast: Autocast) -> float: ...


class LMTask:
    """Next-character prediction on random windows of the training text; validation on the held-out 10%."""

    def __init__(self, cfg: TrainConfig, tokenizer: Tokenizer | None = None) -> None:
        self.cfg = cfg
        self.data = CharLMData.from_file(cfg.data, tokenizer)
        self.tokenizer = self.data.tokenizer
        self.generator = torch.Generator().manual_seed(cfg.seed + 1)

    def model_config(self) -> TransformerConfig:
        c = self.cfg
        return TransformerConfig(
            arch="decoder-only", vocab_size=self.tokenizer.vocab_size, d_model=c.d_model, h=c.heads, d_ff=c.d_ff,
            n_encoder_layers=0, n_decoder_layers=c.layers, max_len=c.block, norm="pre", positional="learned",
            activation="gelu", scale_embeddings=False, dropout=c.dropout, attn_dropout=c.attn_dropout or 0.0,
            bias=bool(c.bias), tie_embeddings=True,
        )

    def train_step(self, model: nn.Module, device: torch.device, autocast: Autocast) -> Step:
        x, y = self.data.batch("train", self.cfg.batch_size, self.cfg.block, self.generator)  # (B, T) each
        with autocast:
            logits = model(x.to(device))
        loss, nll = smoothed_losses(logits, y.to(device), self.cfg.smoothing)
        return Step(loss, nll, y.numel())

    @torch.no_grad()
    def evaluate(self, model: nn.Module, device: torch.device, autocast: Autocast) -> float:
        total, count = torch.zeros((), device=device), 0
        for x, y in self.data.eval_windows("val", self.cfg.block, self.cfg.eval_batch_size, self.cfg.eval_limit):
            with autocast:
                logits = model(x.to(device))
            total += smoothed_losses(logits, y.to(device))[1] * y.numel()
            count += y.numel()
        return float(total) / max(count, 1)

    def state(self) -> dict[str, Any]:
        return {}

    def load_state(self, state: dict[str, Any]) -> None:
        pass

    def rng_tensors(self) -> dict[str, Tensor]:
        return {"rng.data": self.generator.get_state()}

    def load_rng(self, tensors: dict[str, Tensor]) -> None:
        self.generator.set_state(tensors["rng.data"])


class TranslationTask:
    """Source -> target with a shared byte-level BPE vocabulary; token-bucketed batches, shuffled per epoch."""

    def __init__(self, cfg: TrainConfig, tokenizer: Tokenizer | None = None) -> None:
        self.cfg = cfg
        src_train, tgt_train = read_parallel(cfg.data, "train", cfg.src_lang, cfg.tgt_lang)
        src_val, tgt_val = read_parallel(cfg.data, "val", cfg.src_lang, cfg.tgt_lang)
        if tokenizer is None:
            tokenizer = Tokenizer.train_bpe(src_train + tgt_train, vocab_size=cfg.vocab_size)
        self.tokenizer = tokenizer
        self.train = TranslationData(src_train, tgt_train, tokenizer, max_len=cfg.max_len)
        self.val = TranslationData(src_val, tgt_val, tokenizer, max_len=cfg.max_len)
        self.pad_id = int(tokenizer.pad_id)  # type: ignore[arg-type]
        self.generator = torch.Generator().manual_seed(cfg.seed + 1)
        self.epoch_index = 0
        self.position = 0  # batches of the current epoch already used
        self.epoch_rng = self.generator.get_state()  # the generator state that drew the current epoch's order
        self.batches: list[list[int]] = self.train.epoch(cfg.max_tokens, self.generator)

    def model_config(self) -> TransformerConfig:
        c = self.cfg
        return TransformerConfig(
            arch="encoder-decoder", vocab_size=self.tokenizer.vocab_size, d_model=c.d_model, h=c.heads,
            d_ff=c.d_ff, n_encoder_layers=c.encoder_layers or c.layers, n_decoder_layers=c.layers,
            max_len=c.max_len, norm="post", positional="sinusoidal", activation="relu", scale_embeddings=True,
            share_embeddings=True, tie_embeddings=True, dropout=c.dropout, attn_dropout=c.attn_dropout or 0.0,
            bias=bool(c.bias),
        )

    def _next_batch(self) -> TranslationBatch:
        if self.position >= len(self.batches):
            self.epoch_index += 1
            self.position = 0
            self.epoch_rng = self.generator.get_state()
            self.batches = self.train.epoch(self.cfg.max_tokens, self.generator)
        ids = self.batches[self.position]
        self.position += 1
        return self.train.make_batch(ids)

    def _losses(self, model: nn.Module, b: TranslationBatch, smoothing: float,
                autocast: Autocast) -> tuple[Tensor, Tensor]:
        with autocast:
            logits = model(b.src, b.tgt_in, b.src_valid, b.tgt_valid)
        return smoothed_losses(logits, b.tgt_out, smoothing, ignore_index=self.pad_id)

    def _count(self, b: TranslationBatch) -> int:
        return int((b.tgt_out != self.pad_id).sum())  # on the host, before the copy

    def train_step(self, model: nn.Module, device: torch.device, autocast: Autocast) -> Step:
        b = self._next_batch()
        n = self._count(b)
        loss, nll = self._losses(model, b.to(device), self.cfg.smoothing, autocast)
        return Step(loss, nll, n)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, device: torch.device, autocast: Autocast) -> float:
        total, count = torch.zeros((), device=device), 0
        for b in self.val.eval_batches(self.cfg.max_tokens):
            n = self._count(b)
            total += self._losses(model, b.to(device), 0.0, autocast)[1] * n
            count += n
        return float(total) / max(count, 1)

    def state(self) -> dict[str, Any]:
        return {"epoch": self.epoch_index, "position": self.position}

    def load_state(self, state: dict[str, Any]) -> None:
        self.epoch_index, self.position = state["epoch"], state["position"]

    def rng_tensors(self) -> dict[str, Tensor]:
        return {"rng.data": self.generator.get_state(), "rng.epoch": self.epoch_rng}

    def load_rng(self, tensors: dict[str, Tensor]) -> None:
        # Redraw the current epoch's order from the generator state that drew it, then continue from there.
        self.generator.set_state(tensors["rng.epoch"])
        self.epoch_rng = tensors["rng.epoch"]
        self.batches = self.train.epoch(self.cfg.max_tokens, self.generator)
        self.generator.set_state(tensors["rng.data"])


TASKS: dict[str, type[LMTask] | type[TranslationTask]] = {"lm": LMTask, "translation": TranslationTask}


def make_task(cfg: TrainConfig, tokenizer: Tokenizer | None = None) -> Task:
    return TASKS[cfg.task](cfg, tokenizer)

"""Train a Transformer with the paper's recipe: teacher forcing, Adam(0.9, 0.98, 1e-9), the warmup + inverse
square root learning rate (or cosine), label smoothing, dropout, gradient clipping; best-on-validation
checkpoints; exact resume.

    python -m model.train --task lm --data input.txt --out model/checkpoints/shakespeare-gpt ...
    python -m model.train --task translation --data multi30k/ --out model/checkpoints/multi30k-en-de ...

The checkpoint folder (`--out`) receives config.json, model.safetensors, tokenizer.json (the best model on
validation so far), train_log.csv and loss_curve.png. The resume state (weights in float32, optimizer moments,
step, random generator states) goes to a separate folder (`--state-dir`, default `<out>.train-state`) as
train_state.safetensors + train_state.json: nothing is pickled.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm import tqdm

from model.checkpoint import save_checkpoint
from model.config import TransformerConfig
from model.data import CharLMData, TranslationBatch, TranslationData, read_parallel
from model.tokenizer import Tokenizer
from model.train_state import load_train_state, plot_losses, read_csv, save_train_state, write_csv
from model.transformer import build_model, num_parameters

__all__ = ["clip_gradients", "cosine_lr", "label_smoothed_loss", "noam_lr", "read_csv", "train"]


# --- the recipe's pieces ------------------------------------------------------------------------------------


def noam_lr(step: int, d_model: int, warmup: int, scale: float = 1.0) -> float:
    """lrate = scale * d_model^-0.5 * min(step^-0.5, step * warmup^-1.5) (section 5.3); step counts from 1."""
    step = max(step, 1)
    return scale * d_model**-0.5 * min(step**-0.5, step * warmup**-1.5)


def cosine_lr(step: int, peak: float, warmup: int, total: int, min_lr: float = 0.0) -> float:
    """Linear warmup to `peak` over `warmup` steps, then a half cosine down to `min_lr` at `total` steps."""
    step = max(step, 1)
    if step < warmup:
        return peak * step / warmup
    if step >= total:
        return min_lr
    progress = (step - warmup) / max(1, total - warmup)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (peak - min_lr)


def label_smoothed_loss(
    logits: Tensor, target: Tensor, smoothing: float = 0.0, ignore_index: int | None = None
) -> tuple[Tensor, Tensor, int]:
    """Cross-entropy against the smoothed target q = (1 - eps) * onehot(y) + eps / V (section 5.4; Szegedy et
    al. 2016), i.e. (1 - eps) * NLL + eps * mean_v(-log p_v), averaged over the non-ignored positions.

    logits (..., V), target (...). Returns (smoothed loss, plain NLL, number of counted tokens); both losses
    are means over the counted tokens, computed in float32."""
    logp = logits.float().log_softmax(dim=-1).reshape(-1, logits.size(-1))
    target = target.reshape(-1)
    keep = torch.ones_like(target, dtype=torch.bool) if ignore_index is None else target != ignore_index
    n = int(keep.sum())
    if n == 0:
        zero = logp.sum() * 0.0
        return zero, zero.detach(), 0
    logp, target = logp[keep], target[keep]
    nll = -logp.gather(1, target[:, None]).squeeze(1)  # (N,)
    smooth = -logp.mean(dim=-1)  # (N,) cross-entropy against the uniform distribution
    loss = (1.0 - smoothing) * nll + smoothing * smooth
    return loss.mean(), nll.mean().detach(), n


def clip_gradients(parameters: Any, max_norm: float) -> float:
    """Scale the gradients so that their global L2 norm is at most `max_norm`; returns the norm before."""
    params = [p for p in parameters if p.grad is not None]
    if max_norm <= 0:
        return float(torch.linalg.vector_norm(torch.stack([p.grad.detach().norm() for p in params]))) if params else 0.0
    return float(nn.utils.clip_grad_norm_(params, max_norm))


def make_optimizer(model: nn.Module, lr: float, weight_decay: float, beta1: float, beta2: float, eps: float) -> torch.optim.AdamW:
    """AdamW; weight decay (when > 0) only on matrices, not on biases and LayerNorm gains. With 0 it is Adam."""
    unique = {id(p): (n, p) for n, p in model.named_parameters()}.values()
    decay = [p for n, p in unique if p.dim() >= 2]
    no_decay = [p for n, p in unique if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(beta1, beta2), eps=eps)


# --- tasks --------------------------------------------------------------------------------------------------


@dataclass
class Step:
    loss: Tensor  # what is minimized
    nll: float  # plain per-token NLL (for logs)
    tokens: int  # target tokens in the batch


class LMTask:
    """Next-character prediction on random windows of the training text; validation on the held-out 10%."""

    def __init__(self, args: argparse.Namespace, tokenizer: Tokenizer | None = None) -> None:
        self.args = args
        self.data = CharLMData.from_file(args.data, tokenizer)
        self.tokenizer = self.data.tokenizer
        self.generator = torch.Generator().manual_seed(args.seed + 1)

    def config(self, a: argparse.Namespace) -> TransformerConfig:
        return TransformerConfig(
            arch="decoder-only", vocab_size=self.tokenizer.vocab_size, d_model=a.d_model, h=a.heads, d_ff=a.d_ff,
            n_encoder_layers=0, n_decoder_layers=a.layers, max_len=a.block, norm="pre", positional="learned",
            activation="gelu", scale_embeddings=False, dropout=a.dropout, attn_dropout=a.attn_dropout,
            bias=bool(a.bias), tie_embeddings=True,
        )

    def train_step(self, model: nn.Module, device: torch.device, autocast: AbstractContextManager[Any]) -> Step:
        x, y = self.data.batch("train", self.args.batch_size, self.args.block, self.generator)
        x, y = x.to(device), y.to(device)
        with autocast:
            logits = model(x)
        loss, nll, n = label_smoothed_loss(logits, y, self.args.label_smoothing)
        return Step(loss, float(nll), n)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, device: torch.device, autocast: AbstractContextManager[Any]) -> float:
        total, count = 0.0, 0
        for x, y in self.data.eval_windows("val", self.args.block, self.args.eval_batch_size, self.args.eval_limit):
            with autocast:
                logits = model(x.to(device))
            _, nll, n = label_smoothed_loss(logits, y.to(device))
            total += float(nll) * n
            count += n
        return total / max(count, 1)

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

    def __init__(self, args: argparse.Namespace, tokenizer: Tokenizer | None = None) -> None:
        self.args = args
        src_train, tgt_train = read_parallel(args.data, "train", args.src_lang, args.tgt_lang)
        src_val, tgt_val = read_parallel(args.data, "val", args.src_lang, args.tgt_lang)
        if tokenizer is None:
            tokenizer = Tokenizer.train_bpe(src_train + tgt_train, vocab_size=args.vocab_size)
        self.tokenizer = tokenizer
        self.train = TranslationData(src_train, tgt_train, tokenizer, max_len=args.max_len)
        self.val = TranslationData(src_val, tgt_val, tokenizer, max_len=args.max_len)
        self.pad_id = int(tokenizer.pad_id)  # type: ignore[arg-type]
        self.generator = torch.Generator().manual_seed(args.seed + 1)
        self.epoch_index = 0
        self.position = 0  # batches of the current epoch already used
        self.epoch_rng = self.generator.get_state()  # the generator state that drew the current epoch's order
        self.batches: list[list[int]] = self.train.epoch(args.max_tokens, self.generator)

    def config(self, a: argparse.Namespace) -> TransformerConfig:
        return TransformerConfig(
            arch="encoder-decoder", vocab_size=self.tokenizer.vocab_size, d_model=a.d_model, h=a.heads,
            d_ff=a.d_ff, n_encoder_layers=a.encoder_layers or a.layers, n_decoder_layers=a.layers,
            max_len=a.max_len, norm="post", positional="sinusoidal", activation="relu", scale_embeddings=True,
            share_embeddings=True, tie_embeddings=True, dropout=a.dropout, attn_dropout=a.attn_dropout,
            bias=bool(a.bias),
        )

    def _next_batch(self) -> TranslationBatch:
        if self.position >= len(self.batches):
            self.epoch_index += 1
            self.position = 0
            self.epoch_rng = self.generator.get_state()
            self.batches = self.train.epoch(self.args.max_tokens, self.generator)
        ids = self.batches[self.position]
        self.position += 1
        return self.train.make_batch(ids)

    def _loss(self, model: nn.Module, b: TranslationBatch, smoothing: float, autocast: AbstractContextManager[Any]) -> tuple[Tensor, Tensor, int]:
        with autocast:
            logits = model(b.src, b.tgt_in, b.src_valid, b.tgt_valid)
        return label_smoothed_loss(logits, b.tgt_out, smoothing, ignore_index=self.pad_id)

    def train_step(self, model: nn.Module, device: torch.device, autocast: AbstractContextManager[Any]) -> Step:
        b = self._next_batch().to(device)
        loss, nll, n = self._loss(model, b, self.args.label_smoothing, autocast)
        return Step(loss, float(nll), n)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, device: torch.device, autocast: AbstractContextManager[Any]) -> float:
        total, count = 0.0, 0
        for b in self.val.eval_batches(self.args.max_tokens):
            _, nll, n = self._loss(model, b.to(device), 0.0, autocast)
            total += float(nll) * n
            count += n
        return total / max(count, 1)

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
        self.batches = self.train.epoch(self.args.max_tokens, self.generator)
        self.generator.set_state(tensors["rng.data"])


Task = LMTask | TranslationTask

# --- the loop -----------------------------------------------------------------------------------------------


@dataclass
class Result:
    step: int
    best_val: float
    losses: dict[int, float] = field(default_factory=dict)  # step -> training loss (the minimized one)
    val: dict[int, float] = field(default_factory=dict)
    elapsed_s: float = 0.0
    tokens: int = 0
    stopped: str = ""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m model.train", description=__doc__.split("\n\n")[0])
    p.add_argument("--task", choices=("lm", "translation"), required=True)
    p.add_argument("--data", required=True, help="lm: a text file; translation: a folder with {train,val}.{src,tgt}.gz")
    p.add_argument("--out", required=True, help="checkpoint folder (best model on validation)")
    p.add_argument("--state-dir", default=None, help="resume state folder (default: <out>.train-state)")
    p.add_argument("--resume", action="store_true", help="continue from the state in --state-dir")
    # architecture
    p.add_argument("--layers", type=int, default=4, help="decoder layers (and encoder layers unless --encoder-layers)")
    p.add_argument("--encoder-layers", type=int, default=0)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--d-ff", type=int, default=1024)
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--attn-dropout", type=float, default=None, help="default: --dropout")
    p.add_argument("--bias", type=int, default=1, choices=(0, 1))
    p.add_argument("--block", type=int, default=256, help="lm: context length (max_len)")
    p.add_argument("--max-len", type=int, default=128, help="translation: max_len of the model")
    p.add_argument("--vocab-size", type=int, default=8000, help="translation: BPE vocabulary size")
    p.add_argument("--src-lang", default="en")
    p.add_argument("--tgt-lang", default="de")
    # optimization
    p.add_argument("--batch-size", type=int, default=32, help="lm: windows per batch")
    p.add_argument("--max-tokens", type=int, default=4096, help="translation: padded tokens per batch")
    p.add_argument("--max-steps", type=int, default=1000)
    p.add_argument("--max-minutes", type=float, default=0.0, help="stop cleanly after this wall time (0: no limit)")
    p.add_argument("--stop-after", type=int, default=0, help="stop (as if interrupted) after this step; 0: never")
    p.add_argument("--schedule", choices=("noam", "cosine"), default="noam")
    p.add_argument("--warmup", type=int, default=4000)
    p.add_argument("--lr-scale", type=float, default=1.0, help="noam: the factor in front of the formula")
    p.add_argument("--lr", type=float, default=1e-3, help="cosine: the peak learning rate")
    p.add_argument("--min-lr", type=float, default=1e-4, help="cosine: the final learning rate")
    p.add_argument("--decay-steps", type=int, default=0, help="cosine: steps to min-lr (default: --max-steps)")
    p.add_argument("--beta1", type=float, default=0.9)
    p.add_argument("--beta2", type=float, default=0.98)
    p.add_argument("--adam-eps", type=float, default=1e-9)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--label-smoothing", type=float, default=None, help="default: 0.1 for translation, 0 for lm")
    p.add_argument("--clip", type=float, default=1.0, help="max gradient norm (<= 0: no clipping)")
    # machinery
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    p.add_argument("--device", default=None, help="default: cuda when present, else cpu")
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast for the forward pass")
    p.add_argument("--eval-interval", type=int, default=200)
    p.add_argument("--eval-limit", type=int, default=None, help="lm: validation windows per evaluation (default: all)")
    p.add_argument("--eval-batch-size", type=int, default=32)
    p.add_argument("--log-interval", type=int, default=10)
    p.add_argument("--save-dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    if a.attn_dropout is None:
        a.attn_dropout = a.dropout
    if a.label_smoothing is None:
        a.label_smoothing = 0.1 if a.task == "translation" else 0.0
    return a


def lr_for(a: argparse.Namespace, step: int, d_model: int) -> float:
    if a.schedule == "noam":
        return noam_lr(step, d_model, a.warmup, a.lr_scale)
    return cosine_lr(step, a.lr, a.warmup, a.decay_steps or a.max_steps, a.min_lr)


def _batches_forever(task: Task, model: nn.Module, device: torch.device, ac: Any) -> Iterator[Step]:
    while True:
        yield task.train_step(model, device, ac)


def train(argv: list[str] | None = None) -> Result:
    a = parse_args(argv)
    if a.threads > 0:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    out = Path(a.out)
    state_dir = Path(a.state_dir) if a.state_dir else out.with_name(out.name + ".train-state")
    torch.manual_seed(a.seed)
    tokenizer = None
    if a.resume:
        tokenizer = Tokenizer.from_file(state_dir / "tokenizer.json")
    task: Task = LMTask(a, tokenizer) if a.task == "lm" else TranslationTask(a, tokenizer)
    cfg = task.config(a)
    model = build_model(cfg).to(device)
    optimizer = make_optimizer(model, lr_for(a, 1, cfg.d_model), a.weight_decay, a.beta1, a.beta2, a.adam_eps)
    autocast: AbstractContextManager[Any] = (
        torch.autocast(device.type, dtype=torch.bfloat16) if a.bf16 else nullcontext()
    )
    out.mkdir(parents=True, exist_ok=True)
    log_file = out / "train_log.csv"
    step, best_val, tokens, elapsed_before = 0, float("inf"), 0, 0.0
    rows: list[dict[str, Any]] = []
    if a.resume:
        info = load_train_state(state_dir, model, optimizer, task, device)
        step, best_val, tokens, elapsed_before = info["step"], info["best_val"], info["tokens"], info["elapsed_s"]
        rows = [r for r in read_csv(log_file) if int(r["step"]) <= step]
    else:
        state_dir.mkdir(parents=True, exist_ok=True)
        task.tokenizer.save(state_dir / "tokenizer.json")
    n_params = num_parameters(model)
    print(
        f"model: {cfg.arch}, {n_params:,} parameters, vocab {cfg.vocab_size}; device {device}, "
        f"threads {torch.get_num_threads()}, bf16 {a.bf16}; starting at step {step}",
        file=sys.stderr,
    )
    result = Result(step=step, best_val=best_val)
    title = f"{out.name}: {n_params / 1e6:.2f}M parameters"

    def evaluate_and_save(now_elapsed: float) -> None:
        nonlocal best_val
        model.eval()
        val = task.evaluate(model, device, autocast)
        model.train()
        result.val[step] = val
        rows.append({"step": step, "tokens": tokens, "val_loss": f"{val:.6f}", "elapsed_s": f"{now_elapsed:.1f}"})
        if val < best_val:
            best_val = val
            save_checkpoint(model, task.tokenizer, out, dtype=a.save_dtype)
        write_csv(log_file, rows)
        plot_losses(rows, out / "loss_curve.png", title)
        meta = {"step": step, "best_val": best_val, "tokens": tokens, "elapsed_s": now_elapsed, "args": vars(a)}
        save_train_state(state_dir, model, optimizer, task, meta)
        tqdm.write(f"step {step}: val loss {val:.4f} (best {best_val:.4f})", file=sys.stderr)

    start = time.perf_counter()
    model.train()
    bar = tqdm(
        total=a.max_steps, initial=step, disable=a.no_progress, dynamic_ncols=True,
        mininterval=1.0 if sys.stderr.isatty() else 30.0, file=sys.stderr,
    )
    window_loss, window_tokens, window_start, window_steps, window_norm = 0.0, 0, time.perf_counter(), 0, 0.0
    stopped = "max_steps"
    batches = _batches_forever(task, model, device, autocast)
    while step < a.max_steps:
        lr = lr_for(a, step + 1, cfg.d_model)
        for g in optimizer.param_groups:
            g["lr"] = lr
        s = next(batches)
        optimizer.zero_grad(set_to_none=True)
        s.loss.backward()
        norm = clip_gradients(model.parameters(), a.clip)
        optimizer.step()
        step += 1
        tokens += s.tokens
        loss = float(s.loss.detach())
        if not math.isfinite(loss):
            raise FloatingPointError(f"loss is {loss} at step {step}")
        result.losses[step] = loss
        window_loss += s.nll
        window_tokens += s.tokens
        window_steps += 1
        window_norm += norm
        elapsed = elapsed_before + time.perf_counter() - start
        if step % a.log_interval == 0:
            dt = time.perf_counter() - window_start
            tps = window_tokens / dt if dt > 0 else 0.0
            rows.append({
                "step": step, "tokens": tokens, "lr": f"{lr:.6g}", "train_loss": f"{window_loss / window_steps:.6f}",
                "grad_norm": f"{window_norm / window_steps:.4f}", "elapsed_s": f"{elapsed:.1f}",
                "tokens_per_s": f"{tps:.1f}",
            })
            bar.set_postfix(loss=f"{window_loss / window_steps:.4f}", lr=f"{lr:.2e}", tok_s=f"{tps:.0f}", refresh=False)
            window_loss, window_tokens, window_start, window_steps, window_norm = 0.0, 0, time.perf_counter(), 0, 0.0
        bar.update(1)
        out_of_time = a.max_minutes > 0 and time.perf_counter() - start >= a.max_minutes * 60
        interrupted = a.stop_after > 0 and step >= a.stop_after
        if step % a.eval_interval == 0 or step == a.max_steps or out_of_time or interrupted:
            evaluate_and_save(elapsed)
            window_start = time.perf_counter()  # evaluation time does not count against tokens/s
        if out_of_time or interrupted:
            stopped = "max_minutes" if out_of_time else "stop_after"
            break
    bar.close()
    if not result.val and step == 0:
        evaluate_and_save(elapsed_before + time.perf_counter() - start)
    result.step, result.best_val = step, best_val
    result.elapsed_s = elapsed_before + time.perf_counter() - start
    result.tokens, result.stopped = tokens, stopped
    print(
        json.dumps({
            "step": step, "best_val_loss": round(best_val, 5), "elapsed_s": round(result.elapsed_s, 1),
            "tokens": tokens, "parameters": n_params, "stopped": stopped, "out": str(out),
        }),
    )
    return result


def main(argv: list[str] | None = None) -> None:
    train(argv)


if __name__ == "__main__":
    main()

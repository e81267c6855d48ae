"""Train a Transformer with the paper's recipe: teacher forcing, Adam(0.9, 0.98, 1e-9), the warmup + inverse
square root learning rate (or cosine), label smoothing, dropout, gradient clipping; best-on-validation
checkpoints; exact resume.

    python -m model.train --task lm --data input.txt --out model/checkpoints/shakespeare-gpt ...
    python -m model.train --task translation --data multi30k/ --out model/checkpoints/multi30k-en-de ...

The checkpoint folder (`--out`) receives config.json, model.safetensors, tokenizer.json (the best model on
validation so far), train_log.csv and loss_curve.png. The resume state (weights in float32, optimizer moments,
step, random generator states) goes to a separate folder (`--state-dir`, default `<out>.train-state`) as
train_state.safetensors + train_state.json: nothing is pickled.

The loop reads nothing back from the device between log rows: losses, gradient norms and NLLs stay tensors until
the log interval (or an evaluation), where one copy brings them all to the host.
"""

from __future__ import annotations

import json
import math
import sys
import time
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm import tqdm

from model.checkpoint import save_checkpoint
from model.recipe import clip_gradients, cosine_lr, label_smoothed_loss, make_optimizer, noam_lr
from model.tasks import Task, make_task
from model.tokenizer import Tokenizer
from model.train_config import TrainConfig, parse_args
from model.train_state import load_train_state, plot_losses, read_csv, save_train_state, write_csv
from model.transformer import build_model, num_parameters

__all__ = ["TrainConfig", "clip_gradients", "cosine_lr", "label_smoothed_loss", "noam_lr", "read_csv", "train"]
DESCRIPTION = (__doc__ or "").split("\n\n")[0]


@dataclass
class Result:
    step: int
    best_val: float
    losses: dict[int, float] = field(default_factory=dict)  # step -> training loss (the minimized one)
    val: dict[int, float] = field(default_factory=dict)
    elapsed_s: float = 0.0
    tokens: int = 0
    stopped: str = ""


@dataclass
class Window:
    """What the steps since the last log row add up to, on the device until the row is written."""

    losses: list[tuple[int, Tensor]] = field(default_factory=list)  # (step, minimized loss) not yet read back
    nll: Tensor | float = 0.0
    norm: Tensor | float = 0.0
    steps: int = 0
    tokens: int = 0
    start: float = field(default_factory=time.perf_counter)


class Trainer:
    """One run: the task, the model and its optimizer, the log rows, and the loop that ties them."""

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg
        if cfg.threads > 0:
            torch.set_num_threads(cfg.threads)
        self.device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.out = Path(cfg.out)
        self.state_dir = Path(cfg.state_dir) if cfg.state_dir else self.out.with_name(self.out.name + ".train-state")
        torch.manual_seed(cfg.seed)
        tokenizer = Tokenizer.from_file(self.state_dir / "tokenizer.json") if cfg.resume else None
        self.task: Task = make_task(cfg, tokenizer)
        self.model_cfg = self.task.model_config()
        self.model = build_model(self.model_cfg).to(self.device)
        self.optimizer = make_optimizer(self.model, self.lr(1), cfg.weight_decay, cfg.beta1, cfg.beta2, cfg.adam_eps)
        self.autocast: AbstractContextManager[Any] = (
            torch.autocast(self.device.type, dtype=torch.bfloat16) if cfg.bf16 else nullcontext())
        self.out.mkdir(parents=True, exist_ok=True)
        self.log_file = self.out / "train_log.csv"
        self.step, self.best_val, self.tokens, self.elapsed_before = 0, float("inf"), 0, 0.0
        self.rows: list[dict[str, Any]] = []
        if cfg.resume:
            info = load_train_state(self.state_dir, self.model, self.optimizer, self.task, self.device)
            self.step, self.best_val, self.tokens = info["step"], info["best_val"], info["tokens"]
            self.elapsed_before = info["elapsed_s"]
            self.rows = [r for r in read_csv(self.log_file) if int(r["step"]) <= self.step]
        else:
            self.state_dir.mkdir(parents=True, exist_ok=True)
            self.task.tokenizer.save(self.state_dir / "tokenizer.json")
        self.n_params = num_parameters(self.model)
        self.result = Result(step=self.step, best_val=self.best_val)

    def lr(self, step: int) -> float:
        c = self.cfg
        if c.schedule == "noam":
            return noam_lr(step, self.model_cfg.d_model, c.warmup, c.lr_scale)
        return cosine_lr(step, c.lr, c.warmup, c.decay_steps or c.max_steps, c.min_lr)

    def read_back(self, w: Window) -> tuple[float, float]:
        """The one host sync: the window's pending losses into the result (refusing a non-finite one), and its
        mean NLL and gradient norm."""
        pending = [loss for _, loss in w.losses]
        extra = [torch.as_tensor(w.nll, dtype=torch.float32, device=self.device),
                 torch.as_tensor(w.norm, dtype=torch.float32, device=self.device)]
        *values, nll, norm = torch.stack([t.float().to(self.device) for t in [*pending, *extra]]).tolist()
        for (step, _), v in zip(w.losses, values, strict=True):
            if not math.isfinite(v):
                raise FloatingPointError(f"loss is {v} at step {step}")
            self.result.losses[step] = v
        w.losses.clear()
        return nll / max(w.steps, 1), norm / max(w.steps, 1)

    def evaluate_and_save(self, elapsed: float) -> None:
        self.model.eval()
        val = self.task.evaluate(self.model, self.device, self.autocast)
        self.model.train()
        self.result.val[self.step] = val
        self.rows.append({"step": self.step, "tokens": self.tokens, "val_loss": f"{val:.6f}",
                          "elapsed_s": f"{elapsed:.1f}"})
        if val < self.best_val:
            self.best_val = val
            save_checkpoint(self.model, self.task.tokenizer, self.out, dtype=self.cfg.save_dtype)
        write_csv(self.log_file, self.rows)
        plot_losses(self.rows, self.out / "loss_curve.png", f"{self.out.name}: {self.n_params / 1e6:.2f}M parameters")
        meta = {"step": self.step, "best_val": self.best_val, "tokens": self.tokens, "elapsed_s": elapsed,
                "args": asdict(self.cfg)}
        save_train_state(self.state_dir, self.model, self.optimizer, self.task, meta)
        tqdm.write(f"step {self.step}: val loss {val:.4f} (best {self.best_val:.4f})", file=sys.stderr)

    def run(self) -> Result:
        c, model = self.cfg, self.model
        print(f"model: {self.model_cfg.arch}, {self.n_params:,} parameters, vocab {self.model_cfg.vocab_size}; "
              f"device {self.device}, threads {torch.get_num_threads()}, bf16 {c.bf16}; starting at step {self.step}",
              file=sys.stderr)
        start = time.perf_counter()
        model.train()
        bar = tqdm(total=c.max_steps, initial=self.step, disable=c.no_progress, dynamic_ncols=True,
                   mininterval=1.0 if sys.stderr.isatty() else 30.0, file=sys.stderr)
        w, stopped = Window(), "max_steps"
        while self.step < c.max_steps:
            lr = self.lr(self.step + 1)
            for g in self.optimizer.param_groups:
                g["lr"] = lr
            s = self.task.train_step(model, self.device, self.autocast)
            self.optimizer.zero_grad(set_to_none=True)
            s.loss.backward()
            norm = clip_gradients(model.parameters(), c.clip)
            self.optimizer.step()
            self.step += 1
            self.tokens += s.tokens
            w.losses.append((self.step, s.loss.detach()))
            w.nll, w.norm = w.nll + s.nll, w.norm + norm.detach()
            w.steps, w.tokens = w.steps + 1, w.tokens + s.tokens
            elapsed = self.elapsed_before + time.perf_counter() - start
            if self.step % c.log_interval == 0:
                nll, mean_norm = self.read_back(w)
                dt = time.perf_counter() - w.start
                tps = w.tokens / dt if dt > 0 else 0.0
                self.rows.append({
                    "step": self.step, "tokens": self.tokens, "lr": f"{lr:.6g}", "train_loss": f"{nll:.6f}",
                    "grad_norm": f"{mean_norm:.4f}", "elapsed_s": f"{elapsed:.1f}", "tokens_per_s": f"{tps:.1f}"})
                bar.set_postfix(loss=f"{nll:.4f}", lr=f"{lr:.2e}", tok_s=f"{tps:.0f}", refresh=False)
                w = Window()
            bar.update(1)
            out_of_time = c.max_minutes > 0 and time.perf_counter() - start >= c.max_minutes * 60
            interrupted = c.stop_after > 0 and self.step >= c.stop_after
            if self.step % c.eval_interval == 0 or self.step == c.max_steps or out_of_time or interrupted:
                self.read_back(Window(losses=w.losses))  # the losses so far; the log row's sums wait
                self.evaluate_and_save(elapsed)
                w.start = time.perf_counter()  # evaluation time does not count against tokens/s
            if out_of_time or interrupted:
                stopped = "max_minutes" if out_of_time else "stop_after"
                break
        bar.close()
        self.read_back(Window(losses=w.losses))
        if not self.result.val and self.step == 0:
            self.evaluate_and_save(self.elapsed_before + time.perf_counter() - start)
        r = self.result
        r.step, r.best_val, r.tokens, r.stopped = self.step, self.best_val, self.tokens, stopped
        r.elapsed_s = self.elapsed_before + time.perf_counter() - start
        print(json.dumps({"step": self.step, "best_val_loss": round(self.best_val, 5), "elapsed_s": round(r.elapsed_s, 1),
                          "tokens": self.tokens, "parameters": self.n_params, "stopped": stopped, "out": str(self.out)}))
        return r


def train(argv: list[str] | None = None) -> Result:
    """`python -m model.train ...` as a function: parse the flags into a TrainConfig and run it."""
    return Trainer(parse_args(argv, DESCRIPTION)).run()


def main(argv: list[str] | None = None) -> None:
    train(argv)


if __name__ == "__main__":
    main()

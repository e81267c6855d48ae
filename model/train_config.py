"""`TrainConfig`: every knob of a training run, from `python -m model.train` flags; saved with the resume state."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, fields
from typing import Literal


@dataclass
class TrainConfig:
    """One training run: task and paths, architecture, optimization, and the machinery around them."""

    task: Literal["lm", "translation"]
    data: str
    out: str
    state_dir: str | None = None  # default: <out>.train-state
    resume: bool = False
    # architecture
    layers: int = 4
    encoder_layers: int = 0  # 0: as many as `layers`
    d_model: int = 256
    heads: int = 4
    d_ff: int = 1024
    dropout: float = 0.1
    attn_dropout: float | None = None  # None: `dropout`
    bias: int = 1
    block: int = 256  # lm: context length (max_len)
    max_len: int = 128  # translation: max_len of the model
    vocab_size: int = 8000  # translation: BPE vocabulary size
    src_lang: str = "en"
    tgt_lang: str = "de"
    # optimization
    batch_size: int = 32  # lm: windows per batch
    max_tokens: int = 4096  # translation: padded tokens per batch
    max_steps: int = 1000
    max_minutes: float = 0.0
    stop_after: int = 0
    schedule: Literal["noam", "cosine"] = "noam"
    warmup: int = 4000
    lr_scale: float = 1.0
    lr: float = 1e-3
    min_lr: float = 1e-4
    decay_steps: int = 0  # cosine: 0 means max_steps
    beta1: float = 0.9
    beta2: float = 0.98
    adam_eps: float = 1e-9
    weight_decay: float = 0.0
    label_smoothing: float | None = None  # None: 0.1 for translation, 0 for lm
    clip: float = 1.0
    # machinery
    seed: int = 1337
    threads: int = 0
    device: str | None = None
    bf16: bool = False
    eval_interval: int = 200
    eval_limit: int | None = None
    eval_batch_size: int = 32
    log_interval: int = 10
    save_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    no_progress: bool = False

    def __post_init__(self) -> None:
        if self.attn_dropout is None:
            self.attn_dropout = self.dropout
        if self.label_smoothing is None:
            self.label_smoothing = 0.1 if self.task == "translation" else 0.0

    @property
    def smoothing(self) -> float:
        return self.label_smoothing or 0.0


def parser(description: str = "") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m model.train", description=description)
    d = {f.name: f.default for f in fields(TrainConfig)}
    p.add_argument("--task", choices=("lm", "translation"), required=True)
    p.add_argument("--data", required=True, help="lm: a text file; translation: a folder with {train,val}.{src,tgt}.gz")
    p.add_argument("--out", required=True, help="checkpoint folder (best model on validation)")
    p.add_argument("--state-dir", help="resume state folder (default: <out>.train-state)")
    p.add_argument("--resume", action="store_true", help="continue from the state in --state-dir")
    arch = p.add_argument_group("architecture")
    arch.add_argument("--layers", type=int, default=d["layers"], help="decoder layers (and encoder layers unless "
                      "--encoder-layers)")
    arch.add_argument("--encoder-layers", type=int, default=d["encoder_layers"])
    for name in ("d_model", "heads", "d_ff"):
        arch.add_argument(f"--{name.replace('_', '-')}", type=int, default=d[name])
    arch.add_argument("--dropout", type=float, default=d["dropout"])
    arch.add_argument("--attn-dropout", type=float, help="default: --dropout")
    arch.add_argument("--bias", type=int, default=d["bias"], choices=(0, 1))
    arch.add_argument("--block", type=int, default=d["block"], help="lm: context length (max_len)")
    arch.add_argument("--max-len", type=int, default=d["max_len"], help="translation: max_len of the model")
    arch.add_argument("--vocab-size", type=int, default=d["vocab_size"], help="translation: BPE vocabulary size")
    arch.add_argument("--src-lang", default=d["src_lang"])
    arch.add_argument("--tgt-lang", default=d["tgt_lang"])
    opt = p.add_argument_group("optimization")
    opt.add_argument("--batch-size", type=int, default=d["batch_size"], help="lm: windows per batch")
    opt.add_argument("--max-tokens", type=int, default=d["max_tokens"], help="translation: padded tokens per batch")
    opt.add_argument("--max-steps", type=int, default=d["max_steps"])
    opt.add_argument("--max-minutes", type=float, default=d["max_minutes"],
                     help="stop cleanly after this wall time (0: no limit)")
    opt.add_argument("--stop-after", type=int, default=d["stop_after"],
                     help="stop (as if interrupted) after this step; 0: never")
    opt.add_argument("--schedule", choices=("noam", "cosine"), default=d["schedule"])
    opt.add_argument("--warmup", type=int, default=d["warmup"])
    opt.add_argument("--lr-scale", type=float, default=d["lr_scale"], help="noam: the factor in front of the formula")
    opt.add_argument("--lr", type=float, default=d["lr"], help="cosine: the peak learning rate")
    opt.add_argument("--min-lr", type=float, default=d["min_lr"], help="cosine: the final learning rate")
    opt.add_argument("--decay-steps", type=int, default=d["decay_steps"],
                     help="cosine: steps to min-lr (default: --max-steps)")
    for name in ("beta1", "beta2", "adam_eps", "weight_decay"):
        opt.add_argument(f"--{name.replace('_', '-')}", type=float, default=d[name])
    opt.add_argument("--label-smoothing", type=float, help="default: 0.1 for translation, 0 for lm")
    opt.add_argument("--clip", type=float, default=d["clip"], help="max gradient norm (<= 0: no clipping)")
    run = p.add_argument_group("machinery")
    run.add_argument("--seed", type=int, default=d["seed"])
    run.add_argument("--threads", type=int, default=d["threads"], help="torch.set_num_threads (0: torch's default)")
    run.add_argument("--device", help="default: cuda when present, else cpu")
    run.add_argument("--bf16", action="store_true", help="bfloat16 autocast for the forward pass")
    run.add_argument("--eval-interval", type=int, default=d["eval_interval"])
    run.add_argument("--eval-limit", type=int, help="lm: validation windows per evaluation (default: all)")
    run.add_argument("--eval-batch-size", type=int, default=d["eval_batch_size"])
    run.add_argument("--log-interval", type=int, default=d["log_interval"],
                     help="steps between log rows (and the only host syncs of the loop)")
    run.add_argument("--save-dtype", choices=("float32", "bfloat16", "float16"), default=d["save_dtype"])
    run.add_argument("--no-progress", action="store_true")
    return p


def parse_args(argv: list[str] | None = None, description: str = "") -> TrainConfig:
    return TrainConfig(**vars(parser(description).parse_args(argv)))

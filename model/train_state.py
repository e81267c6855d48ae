"""What a training run leaves besides the checkpoint: the exact resume state (safetensors + JSON, nothing
pickled), the CSV log and the loss-curve plot."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

CSV_FIELDS = ("step", "tokens", "lr", "train_loss", "grad_norm", "val_loss", "elapsed_s", "tokens_per_s")


class StatefulTask(Protocol):
    """The part of a training task whose state must survive a resume (data order, random generators)."""

    def state(self) -> dict[str, Any]: ...
    def load_state(self, state: dict[str, Any]) -> None: ...
    def rng_tensors(self) -> dict[str, Tensor]: ...
    def load_rng(self, tensors: dict[str, Tensor]) -> None: ...


# --- resume state -------------------------------------------------------------------------------------------


def save_train_state(
    folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer, task: StatefulTask, meta: dict[str, Any]
) -> None:
    """train_state.safetensors (weights, optimizer moments, RNG states) + train_state.json (the rest)."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, Tensor] = {}
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if id(p) not in seen:
            seen.add(id(p))
            tensors[f"model.{name}"] = p.detach().float().cpu().contiguous()
    opt = optimizer.state_dict()
    for idx, st in opt["state"].items():
        for k, v in st.items():
            t = v if isinstance(v, Tensor) else torch.tensor(v)
            tensors[f"optim.{idx}.{k}"] = t.detach().cpu().contiguous()
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    tensors.update(task.rng_tensors())
    groups = [{k: v for k, v in g.items()} for g in opt["param_groups"]]
    info = {**meta, "task": task.state(), "param_groups": groups}
    tmp = folder / "train_state.safetensors.tmp"
    save_file(tensors, str(tmp))
    tmp.replace(folder / "train_state.safetensors")
    (folder / "train_state.json.tmp").write_text(json.dumps(info, indent=2) + "\n")
    (folder / "train_state.json.tmp").replace(folder / "train_state.json")


def load_train_state(
    folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer, task: StatefulTask, device: torch.device
) -> dict[str, Any]:
    info = json.loads((folder / "train_state.json").read_text())
    tensors = load_file(str(folder / "train_state.safetensors"))
    seen: set[int] = set()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if id(p) not in seen:
                seen.add(id(p))
                p.copy_(tensors[f"model.{name}"].to(p.dtype))
    state: dict[int, dict[str, Tensor]] = {}
    for key, t in tensors.items():
        if key.startswith("optim."):
            _, idx, k = key.split(".", 2)
            state.setdefault(int(idx), {})[k] = t.to(device) if k != "step" else t
    groups = info["param_groups"]
    for g in groups:
        g["betas"] = tuple(g["betas"])
    optimizer.load_state_dict({"state": state, "param_groups": groups})
    torch.set_rng_state(tensors["rng.torch"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    task.load_state(info["task"])
    task.load_rng(tensors)
    return info


# --- logging ------------------------------------------------------------------------------------------------


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k, "") for k in CSV_FIELDS})


def read_csv(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    with path.open() as f:
        return [dict(r) for r in csv.DictReader(f)]


def plot_losses(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(int(r["step"]), float(r["train_loss"])) for r in rows if r.get("train_loss") not in ("", None)]
    val = [(int(r["step"]), float(r["val_loss"])) for r in rows if r.get("val_loss") not in ("", None)]
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=100)
    if train:
        ax.plot(*zip(*train, strict=True), label="train (per-token NLL)", lw=1)
    if val:
        ax.plot(*zip(*val, strict=True), "o-", label="validation (per-token NLL)", ms=3)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)

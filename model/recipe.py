"""The paper's training recipe, piece by piece: the learning-rate schedules (warmup + inverse square root, or
cosine), label-smoothed cross-entropy, gradient clipping and the optimizer. None of them syncs with the host."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn


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


def smoothed_losses(logits: Tensor, target: Tensor, smoothing: float = 0.0,
                    ignore_index: int | None = None) -> tuple[Tensor, Tensor]:
    """Cross-entropy against the smoothed target q = (1 - eps) * onehot(y) + eps / V (section 5.4; Szegedy et
    al. 2016), i.e. (1 - eps) * NLL + eps * mean_v(-log p_v), averaged over the non-ignored positions.

    logits (..., V), target (...). Returns (smoothed loss, plain NLL), both means over the counted tokens in
    float32, as device tensors: ignored positions are weighted out, never indexed out (no host sync)."""
    logp = logits.float().log_softmax(dim=-1).reshape(-1, logits.size(-1))  # (N, V)
    target = target.reshape(-1)  # (N,)
    keep = torch.ones_like(target, dtype=torch.bool) if ignore_index is None else target != ignore_index
    weight = keep.float()
    count = weight.sum().clamp(min=1.0)
    nll = -logp.gather(1, target.masked_fill(~keep, 0)[:, None]).squeeze(1)  # (N,)
    smooth = -logp.mean(dim=-1)  # (N,) cross-entropy against the uniform distribution
    loss = ((1.0 - smoothing) * nll + smoothing * smooth) * weight
    return loss.sum() / count, ((nll * weight).sum() / count).detach()


def label_smoothed_loss(logits: Tensor, target: Tensor, smoothing: float = 0.0,
                        ignore_index: int | None = None) -> tuple[Tensor, Tensor, int]:
    """smoothed_losses plus the number of counted tokens (a host sync when there is an ignore_index)."""
    loss, nll = smoothed_losses(logits, target, smoothing, ignore_index)
    n = target.numel() if ignore_index is None else int((target != ignore_index).sum())
    return loss, nll, n


def clip_gradients(parameters: Any, max_norm: float) -> Tensor:
    """Scale the gradients so that their global L2 norm is at most `max_norm`; returns the norm before, as a
    tensor on the gradients' device (max_norm <= 0: measure only)."""
    params = [p for p in parameters if p.grad is not None]
    if not params:
        return torch.zeros(())
    if max_norm <= 0:
        return torch.linalg.vector_norm(torch.stack([p.grad.detach().norm() for p in params]))
    return nn.utils.clip_grad_norm_(params, max_norm)


def make_optimizer(model: nn.Module, lr: float, weight_decay: float, beta1: float, beta2: float,
                   eps: float) -> torch.optim.AdamW:
    """AdamW; weight decay (when > 0) only on matrices, not on biases and LayerNorm gains. With 0 it is Adam."""
    unique = {id(p): (n, p) for n, p in model.named_parameters()}.values()
    decay = [p for n, p in unique if p.dim() >= 2]
    no_decay = [p for n, p in unique if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(beta1, beta2), eps=eps)

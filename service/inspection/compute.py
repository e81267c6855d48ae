"""The capture pass: the only inspection module that runs the model.

One teacher-forced forward at batch 1 through the explicit attention path, returning the softmax weights of the
layers asked for. Its inputs are plain token ids and a {kind: layers} map, so that it can move behind the engine
without the rest of the package noticing."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import Tensor

from model.attention import AttentionCapture
from model.transformer import DecoderOnlyLM, Transformer

Weights = dict[tuple[str, int], Tensor]


def capture(model: Transformer | DecoderOnlyLM, encoder_ids: list[int], decoder_ids: list[int],
            layers: Mapping[str, Iterable[int]]) -> Weights:
    """Weights per (kind, layer) in `layers` as (h, T_q, T_k) float32 on the CPU (encoder_ids is [] for an LM).

    Read-only on the model (no cache, no mode switch), so it may run beside the engine's thread."""
    wanted = {k: set(v) for k, v in layers.items()}
    cap = AttentionCapture(wanted, {i for v in wanted.values() for i in v})
    device = next(model.parameters()).device
    with torch.inference_mode():
        dec = torch.tensor([decoder_ids], device=device)  # (1, T)
        if isinstance(model, Transformer):
            memory = model.encode(torch.tensor([encoder_ids], device=device), capture=cap)  # (1, S, d_model)
            if "decoder_self" in wanted or "cross" in wanted:
                model.decode(dec, memory=memory, capture=cap)
        else:
            model.decode(dec, capture=cap)
    return {key: w[0].float().cpu() for key, w in cap.weights.items() if key[1] in wanted.get(key[0], ())}

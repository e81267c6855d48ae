"""A model's weights moved onto 2 MB pages (model/hugepages.py): the moved model computes exactly what it did, tied
weights stay one tensor, the weights lie in memory the kernel backs with huge pages (read from /proc/self/smaps),
and `ATTNSERVE_HUGE_PAGES=0` moves nothing."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from model import hugepages
from model.config import preset
from model.transformer import build_model
from service.engine.weights import prepare

needs_thp = pytest.mark.skipif(not hugepages.available(), reason="no transparent huge pages for advised memory here")


def llama(tie: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = preset("tiny-llama", vocab_size=512, d_model=256, h=4, n_kv_heads=2, d_ff=768, n_decoder_layers=2,
                 max_len=64, tie_embeddings=tie)
    model = build_model(cfg).to(torch.bfloat16).eval()
    prepare(model)  # packed copies for the CPU kernels, as the runner serves it
    return model


def tensors(model: torch.nn.Module) -> list[torch.Tensor]:
    return [t for m in model.modules() for t in [*m._parameters.values(), *m._buffers.values()] if t is not None]


def anon_huge_kb(address: int) -> int:
    """AnonHugePages of the mapping that holds `address`, from /proc/self/smaps."""
    found = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = re.match(r"^([0-9a-f]+)-([0-9a-f]+) ", line)
        if head:
            found = int(head[1], 16) <= address < int(head[2], 16)
        elif found and line.startswith("AnonHugePages:"):
            return int(line.split()[1])
    return 0


@needs_thp
@pytest.mark.parametrize("tie", [True, False])
def test_moved_model_computes_the_same_logits_and_keeps_tied_weights(tie: bool) -> None:
    model = llama(tie)
    tokens = torch.randint(0, 512, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        before = model.logits(model.decode(tokens))
    values = [t.detach().clone() for t in tensors(model)]
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors(model)}
    moved = hugepages.to_huge_pages(model, min_bytes=1)
    assert moved >= sum(storages.values())
    after_tensors = tensors(model)
    assert all(torch.equal(a, b) for a, b in zip(values, after_tensors, strict=True))
    first = min(t.data_ptr() for t in after_tensors)
    assert all(first <= t.data_ptr() < first + moved for t in after_tensors)  # all in the one mapping
    if tie:
        assert model.generator.weight is model.tgt_embed.weight
    with torch.inference_mode():
        assert torch.equal(model.logits(model.decode(tokens)), before)


@needs_thp
def test_weights_lie_on_huge_pages() -> None:
    model = llama(tie=True)
    hugepages.to_huge_pages(model, min_bytes=1)
    weight = model.tgt_embed.weight
    assert anon_huge_kb(weight.data_ptr()) >= 2048, "the mapping holding the weights has no 2 MB page"


def test_off_switch_moves_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ATTNSERVE_HUGE_PAGES", "0")
    model = llama(tie=True)
    before = [t.data_ptr() for t in tensors(model)]
    assert hugepages.to_huge_pages(model, min_bytes=1) == 0
    assert [t.data_ptr() for t in tensors(model)] == before

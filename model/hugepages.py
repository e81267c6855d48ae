"""A model's large CPU tensors moved into memory backed by 2 MB pages (Linux's transparent huge pages).

At one stream a CPU decode step reads every weight once, hundreds of MB a token, at the machine's memory bandwidth.
On 4 KB pages that stream crosses a page, and misses the TLB, every 4 KB: ~65,000 page walks a step for SmolLM2's
268 MB of bfloat16 weights. `to_huge_pages` copies every parameter and buffer of at least `min_bytes` into one
anonymous private mapping advised MADV_HUGEPAGE (where the kernel's THP setting is "always" or "madvise", page faults
there take 2 MB pages, so the same stream walks ~130 pages), each tensor 4 KB-aligned inside it, and points the
module at the copies: the same values, dtype, shape and strides; tensors that shared storage (tied weights) still
do. Where the platform has no MADV_HUGEPAGE, or `ATTNSERVE_HUGE_PAGES=0` is set, nothing moves. Measured in
benchmarks/NOTES.md (section 30)."""

from __future__ import annotations

import mmap
import os
import sys
from pathlib import Path

import torch
from torch import Tensor, nn

HUGE_PAGE = 2 << 20
ALIGN = 4096
THP_SETTING = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def available() -> bool:
    """Whether advised anonymous memory can get huge pages here: Linux, MADV_HUGEPAGE, THP not "never"."""
    if os.environ.get("ATTNSERVE_HUGE_PAGES") == "0":
        return False
    if not sys.platform.startswith("linux") or not hasattr(mmap, "MADV_HUGEPAGE"):
        return False
    try:
        return "[never]" not in THP_SETTING.read_text()
    except OSError:
        return False


def _size(t: Tensor) -> int:
    return int(t.untyped_storage().nbytes())


def to_huge_pages(module: nn.Module, min_bytes: int = 1 << 20) -> int:
    """Move `module`'s CPU parameters and buffers whose storage holds at least `min_bytes` into one
    huge-page-advised mapping; returns the bytes moved (0 where `available()` is not). A storage is copied, its
    tensors repointed and the original let go one at a time, so memory peaks at the model plus one tensor (the
    mapping takes pages as they are written)."""
    if not available():
        return 0
    # by storage address, from before anything moves: the storage, and where its tensors are (module, name,
    # tensor, offset in the storage)
    storages: dict[int, torch.UntypedStorage] = {}
    places: dict[int, list[tuple[nn.Module, str, Tensor, int]]] = {}
    for mod in module.modules():
        for name, t in [*mod._parameters.items(), *mod._buffers.items()]:
            if t is None or t.device.type != "cpu" or t.layout != torch.strided or _size(t) < min_bytes:
                continue
            address = t.untyped_storage().data_ptr()
            places.setdefault(address, []).append((mod, name, t, int(t.storage_offset())))
            storages.setdefault(address, t.untyped_storage())
    if not storages:
        return 0
    total = sum(-(-s.nbytes() // ALIGN) * ALIGN for s in storages.values())
    arena = mmap.mmap(-1, total + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    arena.madvise(mmap.MADV_HUGEPAGE)
    raw = torch.frombuffer(arena, dtype=torch.uint8)  # the tensors over it keep the mapping alive
    at = -raw.data_ptr() % HUGE_PAGE  # the first tensor on a 2 MB boundary
    for address in list(storages):
        storage = storages.pop(address)
        n = storage.nbytes()
        raw[at : at + n].copy_(torch.empty(0, dtype=torch.uint8).set_(storage))
        del storage
        for mod, name, t, start in places.pop(address):  # the same offset, sizes and strides over the copy
            new = torch.empty(0, dtype=t.dtype).set_(raw.untyped_storage(), at // t.element_size() + start,
                                                     t.size(), t.stride())
            if name in mod._parameters:
                mod._parameters[name].data = new  # type: ignore[union-attr]  # a tied parameter: twice, alike
            else:
                mod._buffers[name] = new
        at += -(-n // ALIGN) * ALIGN
    return total

"""The CPU paged-attention kernel against torch's SDPA on the same keys laid out densely.

Random block tables scatter each sequence over the pool; some sequences share their first blocks (a cached
prefix), padded table entries point at the null block, and query heads are grouped over fewer K/V heads. Decode
rows see their whole context; prefill rows see up to their own position (causal). float32 must agree to
rounding, bfloat16 to its precision."""

from __future__ import annotations

import os
import subprocess
import sys
from types import ModuleType

import pytest
import torch
import torch.nn.functional as F

from model import cpu_kernels

BS = 16


@pytest.fixture(scope="module")
def kernel() -> ModuleType:
    module = cpu_kernels.load("paged_attention")
    if module is None:
        pytest.skip(f"no paged-attention kernel here: {cpu_kernels.why_not('paged_attention')}")
    return module


def dense(q: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, table: list[int], n_keys: int) -> torch.Tensor:
    """SDPA of q (h, d) over the first n_keys of one table, in float64."""
    k = kc[table].flatten(0, 1)[:n_keys].transpose(0, 1)[None].double()  # (1, h_kv, T, d)
    v = vc[table].flatten(0, 1)[:n_keys].transpose(0, 1)[None].double()
    return F.scaled_dot_product_attention(q[None, :, None].double(), k, v, enable_gqa=True)[0, :, 0]


def random_step(h: int, h_kv: int, dtype: torch.dtype, seed: int, d: int = 32) -> tuple[torch.Tensor, ...]:
    """A pool of 40 blocks + the null block; 5 sequences, the last three sharing their first two blocks."""
    g = torch.Generator().manual_seed(seed)
    num_blocks = 40
    kc = torch.randn(num_blocks + 1, BS, h_kv, d, generator=g).to(dtype)
    vc = torch.randn(num_blocks + 1, BS, h_kv, d, generator=g).to(dtype)
    ids = torch.randperm(num_blocks, generator=g).tolist()
    shared = ids[:2]
    lens = [1, 23, 70, 40, 33]
    tables = []
    for i, n in enumerate(lens):
        need = -(-n // BS)
        own = [ids.pop() for _ in range(need - (2 if i >= 2 else 0))]
        tables.append(((shared if i >= 2 else []) + own + [num_blocks] * 6)[:6])  # null-padded to 6 blocks
    row_table, context = [], []
    for t, n in enumerate(lens):  # sequences 0-2 decode one row; 3 and 4 prefill their last 5 and 9 tokens
        new = {3: 5, 4: 9}.get(t, 1)
        for p in range(n - new, n):
            row_table.append(t)
            context.append(p + 1)
    q = torch.randn(len(row_table), h, d, generator=g).to(dtype)
    return q, kc, vc, torch.tensor(tables), torch.tensor(row_table), torch.tensor(context)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("h,h_kv", [(4, 4), (8, 2), (6, 1), (9, 3), (16, 2)], ids=["mha", "gqa", "mqa", "g3", "g8"])
@pytest.mark.parametrize("d", [32, 64, 128], ids=["d32-portable", "d64", "d128"])  # 64, 128: the AVX-512 path
def test_paged_attention_equals_dense_sdpa(kernel: ModuleType, dtype: torch.dtype, tol: float, h: int,
                                           h_kv: int, d: int) -> None:
    q, kc, vc, tables, row_table, context = random_step(h, h_kv, dtype, seed=h * 10 + h_kv, d=d)
    out = kernel.paged_attention(q, kc, vc, tables, row_table, context, q.size(-1) ** -0.5)
    assert out.dtype == dtype and out.shape == q.shape
    for n in range(q.size(0)):
        table = tables[row_table[n]].tolist()
        expected = dense(q[n], kc, vc, table, int(context[n]))
        diff = (out[n].double() - expected).abs().max().item()
        assert diff <= tol, f"row {n} (table {int(row_table[n])}, {int(context[n])} keys): {diff:.3g}"


def test_a_shared_block_reads_the_same_for_every_sharer(kernel: ModuleType) -> None:
    """Two sequences whose tables share their first blocks and have equal own keys attend identically."""
    q, kc, vc, tables, _, _ = random_step(8, 2, torch.float32, seed=1)
    tables[3, 2:] = tables[2, 2:]  # sequence 3 now equals sequence 2 block for block
    rows = torch.tensor([2, 3])
    lens = torch.tensor([60, 60])
    same_q = q[:1].expand(2, -1, -1).contiguous()
    out = kernel.paged_attention(same_q, kc, vc, tables, rows, lens, 32 ** -0.5)
    assert torch.equal(out[0], out[1])


def test_refuses_mismatched_inputs(kernel: ModuleType) -> None:
    q, kc, vc, tables, row_table, context = random_step(8, 2, torch.float32, seed=2)
    with pytest.raises(RuntimeError, match="int64"):
        kernel.paged_attention(q, kc, vc, tables.int(), row_table, context, 1.0)
    with pytest.raises(RuntimeError, match="the pool's dtype"):
        kernel.paged_attention(q.bfloat16(), kc, vc, tables, row_table, context, 1.0)  # a float32 pool under bf16


@pytest.mark.parametrize("h,h_kv,d", [(9, 3, 64), (8, 2, 128), (6, 1, 32)], ids=["g3-d64", "g4-d128", "mqa-portable"])
def test_float32_queries_over_a_bfloat16_pool_equal_dense_sdpa(kernel: ModuleType, h: int, h_kv: int, d: int) -> None:
    """--kv-cache-dtype bfloat16 under float32 activations: the keys are the pool's bfloat16 values, the
    arithmetic float32's, so the result matches SDPA over those values to float32 rounding."""
    q, kc, vc, tables, row_table, context = random_step(h, h_kv, torch.float32, seed=h + d, d=d)
    kb, vb = kc.bfloat16(), vc.bfloat16()
    out = kernel.paged_attention(q, kb, vb, tables, row_table, context, d ** -0.5)
    assert out.dtype == torch.float32
    for n in range(q.size(0)):
        expected = dense(q[n], kb, vb, tables[row_table[n]].tolist(), int(context[n]))
        assert (out[n].double() - expected).abs().max().item() <= 1e-5, f"row {n}"


def test_turned_off_the_kernel_says_why_and_the_server_keeps_a_plain_path() -> None:
    code = "from model import cpu_kernels as k; print(k.load() is None, k.why_not())"
    env = {**os.environ, "ATTNSERVE_PAGED_KERNEL": "0"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True turned off by ATTNSERVE_PAGED_KERNEL=0"

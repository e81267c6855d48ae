"""The roofline of one decode step: the least time a step of B sequences can take on this machine.

    python -m benchmarks.roofline --preset gpt2-small --dtype bfloat16 --batch 1,8,32 --context 96

    step time >= max(FLOPs / peak FLOP/s, bytes / memory bandwidth)
    FLOPs = 2 * matmul params * B  +  4 * n_layers * h * d_k * context * B   (q.k and p.v over the context)
    bytes = matmul params * dtype bytes  +  KV bytes per token * (context + 1) * B
    KV bytes per token = 2 * n_layers * kv_heads * d_k * dtype bytes        (K and V; GQA keeps kv_heads < h)

"matmul params" are the non-embedding parameters (attention and FFN weights and biases, norms) plus the LM head
(vocab x d_model, tied or not), which every decode token multiplies by; the token and position lookups are
gathers and cost neither FLOPs nor more than a row of bytes. The count follows the config: K/V projections of
kv_heads * d_k outputs (grouped-query attention), a gated FFN's three matrices, biases only where the model has
them, RMSNorm's weight alone. For GPT-2 (h = kv_heads, h * d_k = d_model) this is 2 * n_layers * d_model per
token and 4 * d_model^2 + 2 * d_model * d_ff per layer as before. Peak FLOP/s is measured with torch.matmul on
large square matrices in each dtype (both operand layouts, the faster counts), bandwidth with a large tensor copy (read + write), on this machine, now:
on a busy machine both come out low."""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from model.checkpoint import DTYPES
from model.config import TransformerConfig, preset


@dataclass(frozen=True)
class Machine:
    """Measured peaks: matmul FLOP/s per dtype and copy bandwidth in bytes/s."""

    device: str
    flops: dict[str, float]
    bandwidth: float
    threads: int
    cpu: str = ""  # the CPU's model name
    cpu_flags: tuple[str, ...] = ()  # the vector-instruction flags that decide the dtype (AVX2, AVX-512, AMX...)


VECTOR_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile", "amx_int8")


def cpu_identity() -> tuple[str, tuple[str, ...]]:
    """(model name, vector flags) from /proc/cpuinfo; empty where it is not there."""
    try:
        lines = open("/proc/cpuinfo").read().splitlines()  # noqa: SIM115
    except OSError:
        return "", ()
    name = next((ln.partition(":")[2].strip() for ln in lines if ln.startswith("model name")), "")
    flags = set(next((ln.partition(":")[2].split() for ln in lines if ln.startswith("flags")), []))
    return name, tuple(f for f in VECTOR_FLAGS if f in flags)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure_matmul(dtype: str, n: int = 2048, seconds: float = 1.0, device: str = "cpu") -> float:
    """FLOP/s of square matmuls in `dtype`, the better of a @ b and a @ b.T (nn.Linear's layout; on CPUs
    without native bf16, torch's bf16 a @ b takes a path ~10x slower than a @ b.T). The size doubles from 256
    up to n while one product takes under seconds / 16, then the best of repeated runs over ~`seconds`."""
    reps = 4 if device.startswith("cuda") else 1
    size = 256
    while True:
        a = torch.randn(size, size, device=device).to(DTYPES[dtype])
        b, c = torch.randn_like(a), torch.empty_like(a)
        for layout in (b, b.t()):
            torch.matmul(a, layout, out=c)
        _sync(device)
        t = time.perf_counter()
        torch.matmul(a, b.t(), out=c)
        _sync(device)
        if size >= n or time.perf_counter() - t > seconds / 16:
            break
        size *= 2
    best, end = float("inf"), time.perf_counter() + seconds
    while time.perf_counter() < end:
        for layout in (b, b.t()):
            t = time.perf_counter()
            for _ in range(reps):
                torch.matmul(a, layout, out=c)
            _sync(device)
            best = min(best, (time.perf_counter() - t) / reps)
    return 2 * size**3 / best


def measure_bandwidth(nbytes: int = 256 * 2**20, seconds: float = 1.0, device: str = "cpu") -> float:
    """Bytes/s of a tensor copy (each copy reads and writes nbytes), best of repeated runs."""
    src = torch.ones(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    _sync(device)
    best, end = float("inf"), time.perf_counter() + seconds
    while time.perf_counter() < end:
        t = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * nbytes / best


def measure_machine(dtypes: tuple[str, ...] = ("float32", "bfloat16"), device: str = "cpu", seconds: float = 1.0,
                    n: int = 2048) -> Machine:
    flops = {d: measure_matmul(d, n, seconds, device) for d in dtypes}
    return Machine(device, flops, measure_bandwidth(seconds=seconds, device=device), torch.get_num_threads(),
                   *cpu_identity())


def matmul_params(cfg: TransformerConfig) -> dict[str, int]:
    """Parameters a decoder-only model's decode step multiplies by: per layer, norms, and the LM head; and the
    model's total (embeddings included once when the head is tied to them)."""
    if cfg.is_encoder_decoder:
        raise ValueError("the decode roofline here is for decoder-only models")
    d, f, b = cfg.d_model, cfg.d_ff, int(cfg.bias)
    kv = cfg.kv_heads * cfg.d_k  # the K and V projections' width
    in_b = b if cfg.qkv_bias is None else int(cfg.qkv_bias)
    attention = 2 * d * d + 2 * d * kv + (d + 2 * kv) * in_b + d * b  # w_q, w_k, w_v (their biases), w_o
    gated = cfg.ffn == "gated"
    ffn = (3 if gated else 2) * d * f + ((2 if gated else 1) * f + d) * b  # w_1 (w_3), w_2
    norm = d * (2 if cfg.norm_kind == "layernorm" and cfg.bias else 1)  # LayerNorm's bias; RMSNorm has none
    layer = attention + ffn + 2 * norm
    non_embedding = cfg.n_decoder_layers * layer + (norm if cfg.final_norm else 0)
    head = cfg.vocab_size * d
    embeddings = head + (cfg.max_len * d if cfg.positional == "learned" else 0)
    total = non_embedding + embeddings + (0 if cfg.tie_embeddings else head)
    return {"per_layer": layer, "non_embedding": non_embedding, "lm_head": head, "matmul": non_embedding + head,
            "total": total}


def kv_bytes_per_token(cfg: TransformerConfig, dtype: str) -> int:
    """K and V of one token in every layer: 2 * n_layers * kv_heads * d_k elements."""
    size = torch.empty((), dtype=DTYPES[dtype]).element_size()
    return 2 * cfg.n_decoder_layers * cfg.kv_heads * cfg.d_k * size


def step_roofline(cfg: TransformerConfig, dtype: str, batch: int, context: float, peak_flops: float,
                  bandwidth: float) -> dict[str, Any]:
    """The lower bound of one decode step of `batch` sequences that each attend over `context` tokens."""
    size = torch.empty((), dtype=DTYPES[dtype]).element_size()
    p = matmul_params(cfg)["matmul"]
    flops = 2 * p * batch + 4 * cfg.n_decoder_layers * cfg.h * cfg.d_k * context * batch  # every query head
    nbytes = p * size + kv_bytes_per_token(cfg, dtype) * (context + 1) * batch  # weights; the context, one written
    compute_ms, memory_ms = 1000 * flops / peak_flops, 1000 * nbytes / bandwidth
    return {"batch": batch, "context": context, "dtype": dtype, "flops": flops, "bytes": nbytes,
            "compute_ms": compute_ms, "memory_ms": memory_ms, "roofline_ms": max(compute_ms, memory_ms),
            "bound": "compute" if compute_ms >= memory_ms else "memory",
            "roofline_tokens_per_s": 1000 * batch / max(compute_ms, memory_ms)}


def roofline_table(cfg: TransformerConfig, dtype: str, batches: list[int], context: float,
                   machine: Machine) -> list[dict[str, Any]]:
    return [step_roofline(cfg, dtype, b, context, machine.flops[dtype], machine.bandwidth) for b in batches]


def _config(a: argparse.Namespace) -> TransformerConfig:
    if a.checkpoint is not None:
        meta = json.loads((a.checkpoint / "config.json").read_text())
        return TransformerConfig.from_dict(meta["architecture"])
    return preset(a.preset, **({"vocab_size": a.vocab_size} if a.vocab_size else {}))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.roofline", description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group()
    src.add_argument("--preset", default="gpt2-small")
    src.add_argument("--checkpoint", type=Path, help="one of our checkpoint folders (its config.json)")
    p.add_argument("--vocab-size", type=int)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", default="1,8,32")
    p.add_argument("--context", type=float, default=96.0, help="average tokens attended over (input + output / 2)")
    p.add_argument("--seconds", type=float, default=1.0, help="time spent on each measurement")
    p.add_argument("--json", type=Path)
    a = p.parse_args(argv)
    machine = measure_machine((a.dtype,), a.device, a.seconds)
    rows = roofline_table(_config(a), a.dtype, [int(x) for x in a.batch.split(",")], a.context, machine)
    result = {"machine": asdict(machine), "params": matmul_params(_config(a)), "steps": rows}
    sys.stdout.write(f"peak {machine.flops[a.dtype] / 1e9:.0f} GFLOP/s ({a.dtype}), copy {machine.bandwidth / 1e9:.1f} GB/s\n")
    for r in rows:
        sys.stdout.write(f"batch {r['batch']:>4}: {r['roofline_ms']:.3f} ms ({r['bound']}-bound), "
                         f"{r['roofline_tokens_per_s']:,.0f} tok/s\n")
    if a.json is not None:
        a.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()

"""How fast each way of multiplying by a weight matrix reads the weights, at decode's row counts.

    python -m benchmarks.matvec [--rows 1,8,32] [--threads N] [--out matvec.md]

At one stream a CPU decode step is bound by memory bandwidth: every weight is read once per token. This times
y = x W^T for SmolLM2-135M's shapes (d_model 576, 3 K/V heads of 64, d_ff 1536, vocabulary 49152) with M rows of
x, for each candidate kernel, and reports the weight bytes read per second (GB/s) and the time of one call.

Each timed call reads a different copy of the weight, cycling through copies that together exceed the last-level
cache, so the weights come from memory as they do in a real step (a decoder's 30 layers do not fit the cache);
the best of several rounds counts. Candidates:

- float32 / bfloat16 `F.linear` (oneDNN or MKL, chosen by torch);
- oneDNN prepacked (`torch.ops.mkldnn._linear_pointwise` on a weight reordered once by `_reorder_linear_weight`,
  the form torch.compile's CPU backend uses), float32 and bfloat16;
- int8 weight-only `torch.ops.aten._weight_int8pack_mm` (per-output-channel scales; its AVX-512 kernel takes
  bfloat16 activations, float32 ones fall to a scalar loop), and int8 dequantized to bfloat16 then `F.linear`.

- ours (model/csrc/matvec.cpp): the weight packed in 16-row panels for AVX-512 BF16's pair dot product, read once
  per call whatever the rows, bfloat16 or int8 (widened in registers), where the CPU has AVX-512 BF16 or AVX2 +
  FMA (csrc/matvec_avx2.h, the same layouts in 8-lane registers; the table's header says which); float32 in
  panels of its own (csrc/matvec_f32.h); and int8 x int8, x quantized in blocks of 32 features, on AVX-512 VNNI
  (csrc/matvec_vnni.h) or AVX2 (csrc/matvec_q8_avx2.h), what serving runs where K is a multiple of 32.

What serving keeps, the fastest per precision here: our kernel for float32, bfloat16 and int8 up to 64 rows where
the CPU has AVX-512 BF16 or AVX2 + FMA (model/cpu_linear.py; float32 in float32 throughout, csrc/matvec_f32.h);
oneDNN prepacked for float32 and bfloat16 elsewhere
(model/prepack.py; about twice F.linear's rate at one row); `_weight_int8pack_mm` with bfloat16 activations for int8
up to 32 rows elsewhere (model/quantize.py; the row `int8_matmul` is that choice). On a shared machine every number is low and
noisy: compare rows of one run, not runs; a run takes a few minutes (`--rows 1 --shapes 3,5,6` is quicker)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from model import cpu_linear
from model.quantize import int8_matmul, quantize_weight
from service.engine.device import best_seconds

SHAPES = {  # (in, out) of SmolLM2-135M's linears
    "q / o (576 -> 576)": (576, 576),
    "k / v (576 -> 192)": (576, 192),
    "qkv fused (576 -> 960)": (576, 960),
    "gate / up (576 -> 1536)": (576, 1536),
    "gate+up fused (576 -> 3072)": (576, 3072),
    "down (1536 -> 576)": (1536, 576),
    "LM head (576 -> 49152)": (576, 49152),
}
WORKING_SET = 256 * 2**20  # bytes of weight copies cycled through: well past a 32 MiB L3


def _weights(make: Callable[[], Tensor | tuple[Tensor, ...]], nbytes: int) -> list[Tensor | tuple[Tensor, ...]]:
    copies = max(2, WORKING_SET // max(1, nbytes))
    return [make() for _ in range(copies)]


def _time(call: Callable[[Tensor | tuple[Tensor, ...]], Tensor], weights: list[Tensor | tuple[Tensor, ...]],
          rounds: int = 3) -> float:
    """Best mean seconds per call over `rounds` passes through every copy (after one warm-up pass)."""
    return best_seconds(call, weights, rounds)


def candidates(k: int, n: int, m: int) -> dict[str, tuple[int, float]]:
    """{name: (weight bytes, seconds per call)} for one shape and row count."""
    x32, w32 = torch.randn(m, k), torch.randn(n, k) / k**0.5
    x16 = x32.bfloat16()
    out: dict[str, tuple[int, float]] = {}

    def run(name: str, nbytes: int, make: Callable[[], Tensor | tuple[Tensor, ...]],
            call: Callable[[Tensor | tuple[Tensor, ...]], Tensor]) -> None:
        try:
            out[name] = (nbytes, _time(call, _weights(make, nbytes)))
        except RuntimeError as exc:  # e.g. oneDNN's bfloat16 reorder without AVX-512 (BW, VL, DQ): not a row
            print(f"(skipped {name}: {str(exc).splitlines()[0][:100]})", flush=True)

    run("float32 F.linear", 4 * n * k, lambda: w32.clone(), lambda w: F.linear(x32, w))  # type: ignore[arg-type]
    run("bfloat16 F.linear", 2 * n * k, lambda: w32.bfloat16(), lambda w: F.linear(x16, w))  # type: ignore[arg-type]
    if torch.backends.mkldnn.is_available():
        linear = torch.ops.mkldnn._linear_pointwise
        run("float32 oneDNN prepacked", 4 * n * k, lambda: torch.ops.mkldnn._reorder_linear_weight(w32.clone(), m),
            lambda w: linear(x32, w, None, "none", [], ""))
        run("bfloat16 oneDNN prepacked", 2 * n * k,
            lambda: torch.ops.mkldnn._reorder_linear_weight(w32.bfloat16(), m),
            lambda w: linear(x16, w, None, "none", [], ""))
    q, scale = quantize_weight(w32)
    run("int8 _weight_int8pack_mm (bf16 x)", n * k, lambda: (q.clone(), scale.bfloat16()),
        lambda w: torch.ops.aten._weight_int8pack_mm(x16, *w))
    if m == 1:  # the float32 kernel is a scalar loop: one row is enough to show it
        run("int8 _weight_int8pack_mm (f32 x)", n * k, lambda: (q.clone(), scale.clone()),
            lambda w: torch.ops.aten._weight_int8pack_mm(x32, *w))
    run("int8 dequantized to bf16 + F.linear", n * k, lambda: (q.clone(), scale.bfloat16()),
        lambda w: F.linear(x16, w[0].to(torch.bfloat16) * w[1][:, None]))
    run("int8 model.quantize.int8_matmul", n * k, lambda: (q.clone(), scale.clone()),
        lambda w: int8_matmul(x32, *w))
    mv = cpu_linear.kernel()
    if mv is not None:  # ours: the weight packed in panels (model/cpu_linear.py), AVX-512 BF16 or AVX2 build
        rows = -(-n // 32) * 32
        scales = F.pad(scale, (0, rows - n)).contiguous()
        run("float32 matvec kernel (ours)", 4 * n * k, lambda: cpu_linear.pack_f32(w32),
            lambda w: mv.linear_f32(x32, w, n, None))
        run("bfloat16 matvec kernel (ours)", 2 * n * k, lambda: cpu_linear.pack(w32.bfloat16()),
            lambda w: mv.linear(x16, w, n, None, None))
        run("int8 matvec kernel (ours, widened to bf16)", n * k, lambda: cpu_linear.pack(q),
            lambda w: mv.linear(x16, w, n, scales, None))
        if mv.has_q8() and k % cpu_linear.Q8_BLOCK == 0:
            run("int8 x int8 kernel (ours, x in int8 blocks)", n * k, lambda: cpu_linear.pack_quads(q),
                lambda w: mv.linear_q8(x16, w, n, scales, None))
    return out


def gemm_peak(size: int = 2048) -> float:
    """Multiply-adds per second of torch's float32 GEMM on square matrices (MKL or oneDNN): the rate the CPU's
    FMA units reach in practice, beside which the many-row products are read (at 32 rows they are compute-bound)."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    return size**3 / best_seconds(lambda w: torch.mm(a, w), [b], 3)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="1,8,32", help="row counts M (decode streams), comma-separated")
    ap.add_argument("--shapes", default=",".join(str(i) for i in range(len(SHAPES))),
                    help="indices into the shape list, comma-separated (default: all)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--out", type=Path, default=None, help="also write the markdown table here")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = [int(r) for r in args.rows.split(",")]
    names = list(SHAPES)
    mv = cpu_linear.kernel()
    lines = [f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU capability "
             f"{torch.backends.cpu.get_cpu_capability()}, matvec kernel {mv.isa() if mv is not None else 'none'}; "
             "GB/s = weight bytes / time of one call; "
             f"weights cycled through {WORKING_SET // 2**20} MiB of copies (from memory, not cache); "
             f"GMAC/s = M x weights / time; float32 GEMM 2048^3 (torch.mm): {gemm_peak() / 1e9:.0f} GMAC/s", "",
             "| shape | M | kernel | GB/s | GMAC/s | us / call |", "|---|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    for i in (int(s) for s in args.shapes.split(",")):
        k, n = SHAPES[names[i]]
        for m in rows:
            for kernel, (nbytes, secs) in candidates(k, n, m).items():
                macs = m * k * n / secs / 1e9
                line = f"| {names[i]} | {m} | {kernel} | {nbytes / secs / 1e9:.1f} | {macs:.1f} | {secs * 1e6:.0f} |"
                print(line, flush=True)
                lines.append(line)
    if args.out is not None:
        args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

"""Markdown tables and PNG plots (matplotlib, Agg backend) for the serving benchmark's results."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # after use("Agg"): the backend is chosen first


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.3g}" if abs(v) < 1 else f"{v:.1f}"
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


LEVEL_HEADERS = ("concurrency", "ok", "failed", "req/s", "output tok/s", "total tok/s", "TTFT mean / med / p99 ms",
                 "TPOT mean / med / p99 ms", "ITL mean / med / p99 ms", "E2E mean / med / p99 ms", "decode step ms",
                 "decode batch")


def _triple(level: dict[str, Any], name: str) -> str:
    return " / ".join(f"{level[f'{k}_{name}_ms']:.1f}" for k in ("mean", "median", "p99"))


def levels_table(levels: Sequence[dict[str, Any]]) -> str:
    """One row per concurrency level of a serve_bench sweep."""
    rows = []
    for lv in levels:
        server = lv.get("server") or {}
        rows.append([lv["concurrency"], lv["completed"], lv["failed"], lv["request_throughput"],
                     lv["output_throughput"], lv["total_token_throughput"], _triple(lv, "ttft"), _triple(lv, "tpot"),
                     _triple(lv, "itl"), _triple(lv, "e2el"), server.get("decode_step_mean_ms", "-"),
                     server.get("mean_decode_batch", "-")])
    return markdown_table(LEVEL_HEADERS, rows)


def plot_levels(series: dict[str, Sequence[dict[str, Any]]], path: Path, title: str = "",
                baselines: dict[str, float] | None = None) -> None:
    """Left: output tokens/s against concurrency per server (+ flat lines for offline baselines).
    Right: median and p99 of TTFT, ITL and end-to-end latency against concurrency per server."""
    fig, (thr, lat) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, levels in series.items():
        xs = [lv["concurrency"] for lv in levels]
        thr.plot(xs, [lv["output_throughput"] for lv in levels], marker="o", label=name)
    for j, (name, value) in enumerate((baselines or {}).items()):
        thr.axhline(value, linestyle="--", color=f"C{len(series) + j}", label=name)
    thr.set(xscale="log", yscale="log", xlabel="concurrent streams", ylabel="output tokens / s", title="throughput")
    thr.legend(fontsize=8)
    styles = {"ttft": "o", "itl": "s", "e2el": "^"}
    for i, (name, levels) in enumerate(series.items()):
        xs = [lv["concurrency"] for lv in levels]
        for metric, marker in styles.items():
            lat.plot(xs, [lv[f"median_{metric}_ms"] for lv in levels], marker=marker, color=f"C{i}",
                     label=f"{name} {metric} median")
            lat.plot(xs, [lv[f"p99_{metric}_ms"] for lv in levels], marker=marker, color=f"C{i}", linestyle=":",
                     label=f"{name} {metric} p99")
    lat.set(xscale="log", yscale="log", xlabel="concurrent streams", ylabel="ms", title="latency (median, p99 dotted)")
    lat.legend(fontsize=6, ncol=2)
    ticks = sorted({lv["concurrency"] for levels in series.values() for lv in levels})
    for ax in (thr, lat):
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.minorticks_off()
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --- the whole comparison (benchmarks.run_cpu) -------------------------------------------------------------------


def _level(run: dict[str, Any], system: str, concurrency: int) -> dict[str, Any] | None:
    levels = (run.get(system) or {}).get("levels") or []
    return next((lv for lv in levels if lv["concurrency"] == concurrency), None)


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _value(run: dict[str, Any], system: str, concurrency: int, key: str) -> float | None:
    level = _level(run, system, concurrency)
    return None if level is None else float(level[key])


def targets(run: dict[str, Any], top: int) -> list[tuple[str, float | None, float, str]]:
    """(target, measured value, limit, "ge"/"le") for one model x dtype; value None when it was not measured."""
    ours = _value(run, "ours", top, "output_throughput")
    static = run.get("hf_static", {}).get("output_throughput")
    out: list[tuple[str, float | None, float, str]] = [
        (f"output tok/s at {top} streams / naive server",
         _ratio(ours, _value(run, "naive", 1, "output_throughput")), 10.0, "ge"),
        (f"output tok/s at {top} streams / HF static batch", _ratio(ours, static), 1.5, "ge"),
        (f"decode step at {top} streams / roofline", (run.get("decode_vs_roofline") or {}).get("ratio"), 2.0, "le"),
        (f"ITL p99 / median at {top} streams",
         _ratio(_value(run, "ours", top, "p99_itl_ms"), _value(run, "ours", top, "median_itl_ms")), 3.0, "le"),
    ]
    long = (run.get("ours") or {}).get("with_long_prompts")
    if long is not None:
        lp = long["long_prompts"]
        out.append((f"ITL p99 / median at {top} streams, a {lp['tokens']}-token prompt every {lp['interval_s']:g} s",
                    _ratio(long["p99_itl_ms"], long["median_itl_ms"]), 3.0, "le"))
    if run["model"] == "shakespeare-gpt":
        out.append(("TTFT median ms at 1 stream", _value(run, "ours", 1, "median_ttft_ms"), 50.0, "le"))
    return out


def models_table(runs: Sequence[dict[str, Any]]) -> str:
    """Each model's shape once: parameters, those a decode token multiplies by, and its K/V bytes per token."""
    rows, seen = [], set()
    for r in runs:
        shape, kv = r.get("shape"), r.get("kv_bytes_per_token") or {}
        if shape is None or r["model"] in seen:
            continue
        seen.add(r["model"])
        rows.append([r["model"], shape["layers"], shape["d_model"], f"{shape['heads']} / {shape['kv_heads']}",
                     f"{shape['params']:,}", f"{shape['matmul_params']:,}",
                     *(f"{kv[d]:,}" if d in kv else "-" for d in ("float32", "bfloat16"))])
    return markdown_table(["model", "layers", "d_model", "heads (Q / KV)", "params", "matmul params per token",
                           "KV bytes per token float32", "KV bytes per token bfloat16"], rows)


PEER = "llama_cpp"  # results.json's key of llama.cpp's llama-server on the row's weights (benchmarks.llama_peer)


def peer_table(runs: Sequence[dict[str, Any]], top: int) -> str | None:
    """llama.cpp's server per model x precision: its output tokens/s per level and ours / its at 1 and at each
    row's highest concurrency (`top` names the column); None when no row has it."""
    rows, concs = [], sorted({lv["concurrency"] for r in runs for lv in (r.get(PEER) or {}).get("levels", [])})
    for r in runs:
        peer = r.get(PEER)
        if peer is None:
            continue
        if "levels" not in peer:
            rows.append([r["model"], r["dtype"], "-", *("-" for _ in concs), "-", "-", f"not measured: {peer['skipped']}"])
            continue
        hi = r["ours"]["levels"][-1]["concurrency"]
        ratio = [_ratio(_value(r, "ours", c, "output_throughput"), _value(r, PEER, c, "output_throughput"))
                 for c in (1, hi)]
        rows.append([r["model"], r["dtype"], f"{peer['precision']} (KV {peer['kv_cache']})",
                     *((_level(r, PEER, c) or {}).get("output_throughput", "-") for c in concs),
                     *(f"{x:.2f}x" if x is not None else "-" for x in ratio), peer["gguf"]])
    if not rows:
        return None
    head = ["model", "ours", "llama.cpp", *[f"llama.cpp c={c} tok/s" for c in concs], "ours / llama.cpp c=1",
            f"ours / llama.cpp c={top}", "GGUF"]
    notes = sorted({f"{r['model']}: {r[PEER]['note']}." for r in runs if (r.get(PEER) or {}).get("note")})
    return ("llama.cpp's llama-server on the same weights (converted by its convert_hf_to_gguf.py), the same "
            "token-id prompts, streaming over the OpenAI API; output tokens/s (at one stream, each side's median of "
            "its runs: `runs_output_throughput` in results.json), and ours / llama.cpp:\n\n"
            + markdown_table(head, rows) + "".join(f"\n\n{n}" for n in notes))


def summary_tables(runs: Sequence[dict[str, Any]], machine: Any, top: int) -> str:
    """The README's tables: each model's shape, throughput and latency per model x dtype, then each target met
    or not (at each run's own highest concurrency; `top` names the latency column)."""
    concs = sorted({lv["concurrency"] for r in runs for lv in r["ours"]["levels"]})
    head = ["model", "dtype", *[f"ours c={c} tok/s" for c in concs], "naive c=1 tok/s", "HF static tok/s",
            "TTFT med c=1 ms", f"ITL med / p99 c={top} ms", f"decode step c={top} ms (batch)", "roofline ms"]
    rows = []
    for r in runs:
        ours = [(_level(r, "ours", c) or {}).get("output_throughput", "-") for c in concs]
        naive = (_level(r, "naive", 1) or {}).get("output_throughput", "-")
        one, hi = _level(r, "ours", 1) or {}, _level(r, "ours", top) or {}
        dv = r.get("decode_vs_roofline") or {}
        rows.append([r["model"], r["dtype"], *ours, naive, r.get("hf_static", {}).get("output_throughput", "-"),
                     one.get("median_ttft_ms", "-"),
                     f"{hi.get('median_itl_ms', 0):.1f} / {hi.get('p99_itl_ms', 0):.1f}",
                     f"{dv['measured_ms']:.1f} ({dv['decode_batch']:.1f})" if dv else "-",
                     f"{dv['roofline_ms']:.2f} ({dv['bound']})" if dv else "-"])
    checks = []
    for r in runs:
        for name, value, limit, sense in targets(r, r["ours"]["levels"][-1]["concurrency"]):
            ok = value is not None and (value >= limit if sense == "ge" else value <= limit)
            verdict = "not measured" if value is None else ("met" if ok else "MISSED")
            checks.append([r["model"], r["dtype"], name, "-" if value is None else value,
                           f"{'>=' if sense == 'ge' else '<='} {limit:g}", verdict])
    peaks = ", ".join(f"{k} {v / 1e9:,.0f} GFLOP/s" for k, v in machine.flops.items())
    return "\n\n".join([
        f"Machine: {machine.device}, {machine.threads} threads; matmul {peaks}; copy {machine.bandwidth / 1e9:.1f} GB/s."
        + (f"\nCPU: {machine.cpu}; flags: {' '.join(machine.cpu_flags) or 'none of ' + 'AVX2/AVX-512/AMX'}."
           if machine.cpu else ""),
        models_table(runs),
        markdown_table(head, rows),
        *filter(None, [peer_table(runs, top)]),
        markdown_table(["model", "dtype", "target", "measured", "limit", "verdict"], checks),
    ])


def plot_summary(runs: Sequence[dict[str, Any]], path: Path) -> None:
    """Bars: output tokens/s of ours at the highest concurrency, the naive server and the static batch."""
    if not runs:
        return
    labels = [f"{r['model']}\n{r['dtype']}" for r in runs]
    systems = {
        f"ours (c={runs[0]['ours']['levels'][-1]['concurrency']})":
            [r["ours"]["levels"][-1]["output_throughput"] for r in runs],
        "naive server (c=1)": [(_level(r, "naive", 1) or {}).get("output_throughput", 0.0) for r in runs],
        "HF static batch": [r.get("hf_static", {}).get("output_throughput", 0.0) for r in runs],
    }
    if any("levels" in (r.get(PEER) or {}) for r in runs):
        systems["llama.cpp server (same c)"] = [
            (_level(r, PEER, r["ours"]["levels"][-1]["concurrency"]) or {}).get("output_throughput", 0.0) for r in runs]
    fig, ax = plt.subplots(figsize=(max(6, 2.2 * len(runs)), 4.5))
    width = 0.8 / len(systems)
    for i, (name, values) in enumerate(systems.items()):
        ax.bar([x + i * width for x in range(len(runs))], values, width, label=name)
    ax.set_xticks([x + width for x in range(len(runs))], labels, fontsize=8)
    ax.set(yscale="log", ylabel="output tokens / s", title="streaming output throughput, same weights")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_pair(res: dict[str, Any], out: Path) -> None:
    stem = f"{res['model']}-{res['dtype']}"
    parts = [f"## {res['model']} {res['dtype']}\n", "### ours\n", levels_table(res["ours"]["levels"])]
    if "levels" in res["naive"]:
        parts += ["\n### naive server (transformers generate, one request at a time)\n",
                  levels_table(res["naive"]["levels"])]
    peer = res.get(PEER) or {}
    if "levels" in peer:
        parts += [f"\n### llama.cpp server ({peer['precision']}, {peer['gguf']})\n", levels_table(peer["levels"])]
    (out / f"{stem}.md").write_text("\n".join(parts) + "\n")
    series = {"ours": res["ours"]["levels"]}
    if "levels" in res["naive"]:
        series["naive server"] = res["naive"]["levels"]
    if "levels" in peer:
        series[f"llama.cpp {peer['precision']}"] = peer["levels"]
    lines = {}
    if "output_throughput" in res["hf_static"]:
        lines[f"HF static batch {res['hf_static']['batch']}"] = res["hf_static"]["output_throughput"]
    top_c = res["ours"]["levels"][-1]["concurrency"]
    top = next((r for r in res.get("roofline", []) if r["batch"] == top_c), None)
    if top is not None:
        lines[f"roofline at batch {top['batch']}"] = top["roofline_tokens_per_s"]
    plot_levels(series, out / f"{stem}.png", f"{res['model']} {res['dtype']} ({res['ours']['spec']['input_len']} in / "
                f"{res['ours']['spec']['output_len']} out)", lines)

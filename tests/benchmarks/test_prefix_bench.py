"""benchmarks.prefix_bench end to end at tiny scale: two real servers (prefix caching on, then off) under the
same shared-prefix load, the files it writes, and the prefix-cache counters when the server has the flag."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.prefix_bench import SIDES, caching_flag_supported, main

pytestmark = pytest.mark.timeout(120)

STREAMS, REQUESTS, PREFIX, OWN, OUTPUT = 4, 8, 32, 8, 4  # a 32-token prefix is two full 16-token blocks


def test_shared_prefix_scenario_end_to_end(checkpoints_dir: Path, tmp_path: Path) -> None:
    main(["--models", str(checkpoints_dir / "tiny-gpt"), "--streams", str(STREAMS), "--requests", str(REQUESTS),
          "--prefix-len", str(PREFIX), "--own-len", str(OWN), "--output-len", str(OUTPUT), "--threads", "1",
          "--out", str(tmp_path)])
    stem = tmp_path / "prefix-tiny-gpt-float32"
    res = json.loads(stem.with_name(stem.name + ".json").read_text())
    assert res["prefix_len"] == PREFIX and res["scenario"]["streams"] == STREAMS
    for side in SIDES:
        r = res[side]
        assert (r["completed"], r["failed"]) == (REQUESTS, 0), r["errors"]
        assert r["total_input_tokens"] == REQUESTS * (PREFIX + OWN)  # token ids: exact prompts
        assert r["total_output_tokens"] == REQUESTS * OUTPUT  # ignore_eos: exact lengths
        assert 0 < r["median_ttft_ms"] <= r["p90_ttft_ms"]
        assert r["output_throughput"] == pytest.approx(r["total_output_tokens"] / r["duration_s"])
        assert r["prefill_s"] > 0
    assert res["ratio"]["median_ttft_ms"] > 0
    md = stem.with_name(stem.name + ".md").read_text()
    assert f"| completed | {REQUESTS} | {REQUESTS} | - |" in md and "| TTFT p90 ms |" in md
    assert stem.with_name(stem.name + ".png").stat().st_size > 10_000
    if not caching_flag_supported():
        pytest.skip("the server has no --no-enable-prefix-caching flag yet")
    on, off = res["with_caching"], res["without_caching"]
    assert res["prefix_caching_flag"]
    assert 0 < on["prefix_cache_hits"] <= on["prefix_cache_queries"], on
    assert not off["prefix_cache_hits"], off

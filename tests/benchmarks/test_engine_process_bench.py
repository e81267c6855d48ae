"""benchmarks.engine_process end to end at tiny scale: real servers one after another (the engine thread and the
engine core process), the load generator, the table and the JSON it writes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from support import make_checkpoints

from benchmarks.engine_process import main

pytestmark = pytest.mark.timeout(300)


def test_engine_process_bench_writes_both_servers_rows(tmp_path: Path) -> None:
    model = make_checkpoints(tmp_path / "ckpt") / "tiny-gpt"
    out = tmp_path / "out"
    main(["--model", str(model), "--dtype", "float32", "--input-len", "8", "--output-len", "6", "--out", str(out)])
    table = (out / "engine-process-tiny-gpt-float32.md").read_text()
    assert "engine thread (--engine-in-process)" in table and "engine core process (default)" in table
    runs = json.loads((out / "engine-process-tiny-gpt-float32.json").read_text())["results"]
    for result in runs.values():
        one, many = result["levels"]
        assert (one["completed"], one["failed"], many["completed"], many["failed"]) == (8, 0, 64, 0)
        assert many["total_output_tokens"] == 64 * 6  # ignore_eos: every request its full length
        assert one["server"]["decode_step_mean_ms"] > 0  # the engine's stats reached /metrics from either engine

"""guidellm (the vLLM project's load generator) against the live server with its default request format,
/v1/chat/completions, streamed: a short run finishes every request with no errors and counts the tokens asked for.

guidellm needs a tokenizer to size its synthetic prompts; offline it loads tiny-gpt's tokenizer.json through
transformers' AutoTokenizer from a folder with a tokenizer_config.json naming PreTrainedTokenizerFast."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from support import LiveServer

pytest.importorskip("guidellm")

pytestmark = pytest.mark.usefixtures("one_thread")

OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "DO_NOT_TRACK": "1"}


def tokenizer_folder(checkpoint: Path, folder: Path) -> Path:
    folder.mkdir()
    shutil.copy(checkpoint / "tokenizer.json", folder / "tokenizer.json")
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
              "unk_token": "<unk>", "pad_token": "<pad>"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def test_a_short_guidellm_run_has_no_errors(server: LiveServer, tmp_path: Path) -> None:
    assert server.settings.models_dir is not None
    tok = tokenizer_folder(server.settings.models_dir / "tiny-gpt", tmp_path / "tokenizer")
    out = tmp_path / "benchmarks.json"
    guidellm = Path(sys.executable).with_name("guidellm")
    cmd = [str(guidellm), "run", "--backend", f"kind=openai_http,target={server.url},model=tiny-gpt",
           "--profile", "kind=concurrent,streams=2", "--constraint", "kind=max_requests,count=6",
           "--data", "kind=synthetic_text,prompt_tokens=16,output_tokens=8",
           "--tokenizer", f"kind=huggingface_auto,model={tok}",
           "--output", f"kind=json,path={out}", "--disable-console"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=tmp_path,
                         env={**os.environ, **OFFLINE})
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    bench = json.loads(out.read_text())["benchmarks"][0]
    state = bench["scheduler_state"]
    assert (state["successful_requests"], state["errored_requests"], state["cancelled_requests"]) == (6, 0, 0)
    done = bench["requests"]["successful"]
    assert len(done) == 6 and not bench["requests"]["errored"]
    for r in done:
        body = json.loads(r["request_args"])["body"]
        assert "messages" in body and body["stream"] is True  # the chat format, streamed
        assert r["output_tokens"] == 8 and r["prompt_tokens"] > 16  # ignore_eos and the template's tokens

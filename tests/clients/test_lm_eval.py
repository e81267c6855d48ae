"""lm-evaluation-harness's `local-completions` model against a live server, offline: it finds our vLLM-shaped
/tokenizer_info and /tokenize (its remote tokenizer), scores a local multiple-choice task through echo + logprobs
on token-id prompts, and generates with `generate_until`. Its log-likelihoods equal a forward pass of the same
weights."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from support import LiveServer

from model.checkpoint import load_checkpoint

lm_eval = pytest.importorskip("lm_eval")
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

DOCS = [
    {"context": "ROMEO: But soft, what light", "choices": ["through yonder window", "is the east"], "label": 0},
    {"context": "JULIET: O Romeo, Romeo,", "choices": ["wherefore art thou", "Deny thy father"], "label": 0},
    {"context": "Two dogs play", "choices": ["in the snow.", "Ein Mann"], "label": 0},
]
TASK = """task: tiny_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


@pytest.fixture
def offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No hub: the task's data is a local jsonl that `datasets` reads with its packaged json builder."""
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(var, "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf" / "datasets"))
    monkeypatch.setenv("OPENAI_API_KEY", "unused")
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    data = tasks / "tiny_choice.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    (tasks / "tiny_choice.yaml").write_text(TASK.format(data=data))
    return tasks


def model_args(server: LiveServer) -> dict[str, Any]:
    # tokenizer_backend "auto" picks the remote tokenizer when /tokenizer_info and /tokenize answer as vLLM's do
    return {"model": "tiny-gpt", "base_url": f"{server.url}/v1/completions", "max_length": 128, "max_retries": 1,
            "max_gen_toks": 16, "timeout": 60}


def loglikelihood(server: LiveServer, context: str, continuation: str) -> float:
    """log P(continuation | context) from one forward pass of a fresh copy of the checkpoint."""
    tok = server.models["tiny-gpt"].tokenizer
    ctx, whole = tok.encode(context), tok.encode(context + continuation)
    model = load_checkpoint(server.models["tiny-gpt"].checkpoint.path).model.eval()
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([whole]))[0].float(), dim=-1)  # (T, vocab)
    return float(sum(logp[i - 1, whole[i]] for i in range(len(ctx), len(whole))))


def test_multiple_choice_task_loglikelihoods_equal_a_forward_pass(server: LiveServer, offline: Path) -> None:
    results = lm_eval.simple_evaluate(
        model="local-completions", model_args=model_args(server), tasks=["tiny_choice"],
        task_manager=TaskManager(include_path=str(offline), include_defaults=False), log_samples=True,
        bootstrap_iters=0)
    assert results is not None
    samples = results["samples"]["tiny_choice"]
    assert len(samples) == len(DOCS)
    for sample in samples:
        doc = sample["doc"]
        scores = [resp[0][0] for resp in sample["resps"]]
        want = [loglikelihood(server, doc["context"], " " + c) for c in doc["choices"]]
        assert scores == pytest.approx(want, abs=1e-4)  # lm-eval read token_logprobs[ctxlen:-1]: not zeros
        assert all(s < 0 for s in scores)
    acc = results["results"]["tiny_choice"]["acc,none"]
    assert acc == sum(int(max(range(2), key=lambda i, s=s: s["resps"][i][0][0]) == 0) for s in samples) / len(DOCS)


def test_generate_until_equals_a_greedy_completion(server: LiveServer, offline: Path) -> None:
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    lm = LocalCompletionsAPI(**model_args(server))
    assert lm.tokenizer_backend == "remote"
    contexts = ["ROMEO:", "JULIET: O"]
    args = {"until": ["\n\n"], "max_gen_toks": 12, "temperature": 0}
    requests = [Instance("generate_until", {}, (c, dict(args)), i) for i, c in enumerate(contexts)]
    got = lm.generate_until(requests)
    for context, text in zip(contexts, got, strict=True):
        r = httpx.post(f"{server.url}/v1/completions", timeout=60, json={
            "model": "tiny-gpt", "prompt": context, "max_tokens": 12, "temperature": 0, "stop": ["\n\n", "</s>"]})
        assert text == r.json()["choices"][0]["text"]

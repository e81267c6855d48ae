"""lm-evaluation-harness on a small local multiple-choice task, twice over SmolLM2-135M-Instruct's GGUF file: its
`local-completions` model against our server (remote tokenizer, echo + logprobs on token-id prompts), and its own
`hf` backend loading the same file through transformers. Every document's choice and log-likelihoods agree."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support import LiveServer, settings_for

lm_eval = pytest.importorskip("lm_eval")
from lm_eval.tasks import TaskManager  # noqa: E402

NAME = "smollm2-135m-instruct"
DOCS = [
    {"context": "The capital of France is", "choices": ["Paris.", "Berlin.", "Madrid.", "Rome."], "label": 0},
    {"context": "Water freezes at a temperature of", "choices": ["100 degrees Celsius.", "0 degrees Celsius.",
                                                                 "50 degrees Celsius.", "-40 degrees Celsius."],
     "label": 1},
    {"context": "The largest planet in our solar system is", "choices": ["Mars.", "Venus.", "Jupiter.", "Mercury."],
     "label": 2},
    {"context": "A week has", "choices": ["five days.", "six days.", "ten days.", "seven days."], "label": 3},
    {"context": "The opposite of hot is", "choices": ["cold.", "warm.", "loud.", "tall."], "label": 0},
    {"context": "Bees make", "choices": ["milk.", "honey.", "silk.", "glass."], "label": 1},
    {"context": "The sun rises in the", "choices": ["north.", "south.", "east.", "west."], "label": 2},
    {"context": "Two plus two equals", "choices": ["three.", "five.", "six.", "four."], "label": 3},
    {"context": "The chemical symbol for gold is", "choices": ["Au.", "Ag.", "Fe.", "Pb."], "label": 0},
    {"context": "Shakespeare wrote", "choices": ["War and Peace.", "Hamlet.", "Don Quixote.", "The Odyssey."],
     "label": 1},
]
TASK = """task: smol_facts
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


@pytest.fixture(scope="module")
def tasks(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """No hub: the task's data is a local jsonl that `datasets` reads with its packaged json builder."""
    root = tmp_path_factory.mktemp("lm_eval_smollm2")
    with pytest.MonkeyPatch.context() as mp:
        for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
            mp.setenv(var, "1")
        mp.setenv("HF_HOME", str(root / "hf"))
        mp.setenv("HF_DATASETS_CACHE", str(root / "hf" / "datasets"))
        mp.setenv("OPENAI_API_KEY", "unused")
        folder = root / "tasks"
        folder.mkdir()
        data = folder / "smol_facts.jsonl"
        data.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
        (folder / "smol_facts.yaml").write_text(TASK.format(data=data))
        yield folder


def evaluate(tasks: Path, **kw: Any) -> dict[str, Any]:
    results = lm_eval.simple_evaluate(tasks=["smol_facts"], log_samples=True, bootstrap_iters=0,
                                      task_manager=TaskManager(include_path=str(tasks), include_defaults=False), **kw)
    assert results is not None
    return results  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def ours(smollm2_gguf: Path, tasks: Path) -> Iterator[dict[str, Any]]:
    server = LiveServer(settings_for(None, models=[smollm2_gguf], kv_cache_blocks=None, block_size=16,
                                     max_model_len=512))
    try:
        from lm_eval.models.openai_completions import LocalCompletionsAPI

        lm = LocalCompletionsAPI(model=NAME, base_url=f"{server.url}/v1/completions", max_length=512,
                                 max_retries=1, timeout=120)
        # tokenizer_backend "auto" found our vLLM-shaped /tokenizer_info and /tokenize: token ids go to the server
        assert lm.tokenizer_backend == "remote"
        yield evaluate(tasks, model=lm)
    finally:
        server.stop()


@pytest.fixture(scope="module")
def reference(smollm2_gguf: Path, tasks: Path) -> dict[str, Any]:
    """lm-eval's own `hf` backend: transformers reads the GGUF file (HFLM takes gguf_file)."""
    return evaluate(tasks, model="hf", batch_size=1, device="cpu", model_args=(
        f"pretrained={smollm2_gguf.parent},gguf_file={smollm2_gguf.name},dtype=float32"))


def per_doc(results: dict[str, Any]) -> dict[int, list[float]]:
    """doc_id -> each choice's log-likelihood."""
    samples = results["samples"]["smol_facts"]
    assert len(samples) == len(DOCS)
    return {s["doc_id"]: [float(r[0][0]) for r in s["resps"]] for s in samples}


def test_local_completions_scores_every_choice(ours: dict[str, Any]) -> None:
    for scores in per_doc(ours).values():
        assert len(scores) == 4 and all(s < 0 for s in scores)  # read from token_logprobs, not zeros


def test_every_document_chooses_as_the_hf_backend(ours: dict[str, Any], reference: dict[str, Any]) -> None:
    got, want = per_doc(ours), per_doc(reference)
    assert got.keys() == want.keys() == set(range(len(DOCS)))
    for doc_id, scores in got.items():
        assert scores.index(max(scores)) == want[doc_id].index(max(want[doc_id])), DOCS[doc_id]
    acc = ours["results"]["smol_facts"]["acc,none"]
    assert acc == reference["results"]["smol_facts"]["acc,none"]
    assert acc == sum(s.index(max(s)) == DOCS[i]["label"] for i, s in got.items()) / len(DOCS)


def test_every_loglikelihood_equals_the_hf_backend(ours: dict[str, Any], reference: dict[str, Any]) -> None:
    got, want = per_doc(ours), per_doc(reference)
    for doc_id, scores in got.items():
        assert scores == pytest.approx(want[doc_id], abs=1e-3), DOCS[doc_id]

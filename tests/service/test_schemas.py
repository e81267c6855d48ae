"""The request schemas and the OpenAPI document: every example names the model it was written for and is valid,
every operation is described, and /v1/attention takes its sampling nested or flat but never `stream`."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from service.app import create_app
from service.schemas.inspection import AttentionRequest
from service.settings import SHIPPED_MODELS, Settings

SHIPPED = {p.name for p in SHIPPED_MODELS.iterdir() if (p / "config.json").is_file()}


@pytest.fixture(scope="module")
def spec() -> dict[str, Any]:
    return create_app(Settings(models_dir=None)).openapi()


def _request_examples(spec: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for path, ops in spec["paths"].items():
        for op in ops.values():
            ref = op.get("requestBody", {}).get("content", {}).get("application/json", {}).get("schema", {}).get("$ref")
            if ref:
                schema = spec["components"]["schemas"][ref.rsplit("/", 1)[-1]]
                out += [(path, ex) for ex in schema.get("examples", [])]
    return out


def test_every_operation_has_a_description(spec: dict[str, Any]) -> None:
    missing = [f"{m.upper()} {p}" for p, ops in spec["paths"].items() for m, op in ops.items()
               if not op.get("description")]
    assert not missing


def test_every_example_names_a_shipped_model(spec: dict[str, Any]) -> None:
    examples = _request_examples(spec)
    assert {p for p, _ in examples} >= {"/v1/generate", "/v1/completions", "/v1/attention", "/v1/tokenize"}
    for path, ex in examples:
        assert ex.get("model") in SHIPPED, (path, ex)


def test_translator_examples_give_a_source_sentence(spec: dict[str, Any]) -> None:
    for path, ex in _request_examples(spec):
        if ex["model"] == "multi30k-en-de" and path != "/v1/detokenize":
            text = ex.get("source") or ex.get("prompt") or ex.get("text") or ex.get("messages", [{}])[-1].get("content")
            assert isinstance(text, str) and text.endswith("."), (path, ex)


def test_attention_sampling_nested_or_flat() -> None:
    nested = AttentionRequest.model_validate({"prompt": "a", "generate": True,
                                              "sampling": {"max_tokens": 3, "temperature": 0}})
    flat = AttentionRequest.model_validate({"prompt": "a", "generate": True, "max_tokens": 3, "temperature": 0})
    assert nested.sampling == flat.sampling and flat.sampling.model_fields_set == {"max_tokens", "temperature"}
    assert AttentionRequest.model_validate({"prompt": "a"}).sampling.model_fields_set == set()
    with pytest.raises(ValidationError, match="stream"):
        AttentionRequest.model_validate({"prompt": "a", "stream": True})
    with pytest.raises(ValidationError, match=r"sampling\.temperature"):
        AttentionRequest.model_validate({"prompt": "a", "temperature": 9})

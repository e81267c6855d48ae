"""Property-based API testing with schemathesis against a live server: for every operation in /openapi.json,
cases generated from the schema (valid ones, and ones that break it) never get a 5xx, and every response
matches the schema the operation documents, errors included."""

from __future__ import annotations

from typing import Any

import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import response_schema_conformance

# examples per operation and mode; generation stays cheap because the server caps max_tokens at 8
EXAMPLES = {GenerationMode.POSITIVE: 120, GenerationMode.NEGATIVE: 80}
MIN_CASES = 1000


def _fuzz(op: schemathesis.APIOperation, mode: GenerationMode, examples: int, url: str) -> int:
    """Run `examples` generated cases of one operation; the number that ran."""
    ran = 0

    @given(case=op.as_strategy(generation_mode=mode))
    @settings(max_examples=examples, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck), phases=[Phase.explicit, Phase.generate])
    def check(case: schemathesis.Case) -> None:
        nonlocal ran
        ran += 1
        case.call_and_validate(base_url=url, checks=[not_a_server_error, response_schema_conformance], timeout=60)

    try:
        check()
    except Unsatisfiable:
        # e.g. a string path parameter: every value is valid, so "negative" has nothing to generate
        assert mode == GenerationMode.NEGATIVE and ran == 0, op.label
    return ran


def test_every_operation_survives_generated_requests(make_server: Any) -> None:
    s = make_server(max_tokens_limit=8, max_n=2, max_logprobs=3, inspect_max_tokens=48, max_num_seqs=16)
    schema = schemathesis.openapi.from_url(f"{s.url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]  # type: ignore[union-attr]
    assert {op.path for op in operations} >= {"/health", "/ready", "/v1/models", "/v1/models/{model}",
                                             "/v1/tokenize", "/v1/detokenize", "/v1/generate", "/v1/completions"}
    cases: dict[str, int] = {}
    for op in operations:
        for mode, examples in EXAMPLES.items():
            if mode == GenerationMode.NEGATIVE and not list(op.iter_parameters()) and not list(op.body):
                continue  # nothing to break in a request without parameters or body
            cases[f"{op.method.upper()} {op.path} {mode.value}"] = _fuzz(op, mode, examples, s.url)
    print("schemathesis cases:", cases)
    total = sum(cases.values())
    assert total >= MIN_CASES, cases
    for served in s.models.values():  # nothing left running, nothing leaked
        assert served.engine.dead is None
        assert served.engine.blocks.num_free == served.engine.blocks.num_blocks

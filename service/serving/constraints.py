"""A request's structured-output fields to one Constraint: OpenAI's `response_format` (json_object, json_schema),
vLLM's `structured_outputs` ({json | regex | choice | grammar | json_object}) and its older `guided_json`,
`guided_regex`, `guided_choice`, `guided_grammar`. At most one may be set; each problem is a 400 naming the field.
Compiling (and refusing what does not compile) is the model's: `ServedModel.grammar`, then `compiled` below."""

from __future__ import annotations

import json
from typing import Any

from service.engine.request import Constraint
from service.errors import APIError
from service.registry import ServedModel

MAX_SPEC_CHARS = 65_536  # a schema, regex or grammar's text
MAX_CHOICES = 1024
STRUCTURED_KEYS = ("json", "regex", "choice", "grammar", "json_object")
# vLLM's structured_outputs switches: accepted (whitespace: ours is compact unless disable_any_whitespace is false)
STRUCTURED_SWITCHES = ("disable_any_whitespace", "disable_fallback", "disable_additional_properties")


def _json_spec(value: Any, field: str) -> str:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise APIError(400, f"{field} is not valid JSON: {e}", param=field) from e
    if not isinstance(value, dict | bool):
        raise APIError(400, f"{field} must be a JSON schema (an object)", param=field)
    return _sized(json.dumps(value), field)


def _sized(spec: str, field: str) -> str:
    if not spec:
        raise APIError(400, f"{field} is empty", param=field)
    if len(spec) > MAX_SPEC_CHARS:
        raise APIError(400, f"{field} has {len(spec)} characters; the limit is {MAX_SPEC_CHARS}", param=field)
    return spec


def _one(kind: str, value: Any, field: str, any_whitespace: bool = False) -> Constraint:
    if kind == "json":
        return Constraint("json", _json_spec(value, field), any_whitespace)
    if kind == "json_object":
        return Constraint("json_object", "", any_whitespace)
    if kind == "choice":
        if not isinstance(value, list) or not value or not all(isinstance(c, str) and c for c in value):
            raise APIError(400, f"{field} must be a non-empty list of non-empty strings", param=field)
        if len(value) > MAX_CHOICES:
            raise APIError(400, f"{field} has {len(value)} choices; the limit is {MAX_CHOICES}", param=field)
        return Constraint("choice", _sized(json.dumps(value), field))
    if not isinstance(value, str):
        raise APIError(400, f"{field} must be a string", param=field)
    return Constraint(kind, _sized(value, field))


def _response_format(fmt: dict[str, Any]) -> Constraint | None:
    kind = fmt.get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        return Constraint("json_object")
    if kind == "json_schema":
        spec = fmt.get("json_schema")
        if not isinstance(spec, dict) or "schema" not in spec:
            raise APIError(400, "response_format.json_schema.schema is required", param="response_format.json_schema")
        return _one("json", spec["schema"], "response_format.json_schema.schema")
    raise APIError(400, f"response_format type {kind!r} is not supported; one of 'text', 'json_object', "
                   "'json_schema'", param="response_format.type")


def _structured(so: dict[str, Any]) -> Constraint | None:
    unknown = [k for k in so if k not in STRUCTURED_KEYS + STRUCTURED_SWITCHES]
    if unknown:
        raise APIError(400, f"structured_outputs.{unknown[0]} is not supported; one of "
                       f"{', '.join(STRUCTURED_KEYS + STRUCTURED_SWITCHES)}", param=f"structured_outputs.{unknown[0]}")
    given = [k for k in STRUCTURED_KEYS if so.get(k) not in (None, False)]
    if len(given) > 1:
        raise APIError(400, f"structured_outputs sets {' and '.join(given)}; give one", param="structured_outputs")
    if not given:
        return None
    any_whitespace = so.get("disable_any_whitespace") is False
    return _one(given[0], so[given[0]], f"structured_outputs.{given[0]}", any_whitespace)


def constraint_of(body: Any) -> tuple[Constraint | None, str | None]:
    """(the body's constraint, the field it came from); a 400 when two are set or one is malformed."""
    found: list[tuple[Constraint, str]] = []
    fmt = getattr(body, "response_format", None)
    if fmt:
        c = _response_format(fmt)
        if c is not None:
            found.append((c, "response_format.json_schema.schema" if c.kind == "json" else "response_format"))
    so = getattr(body, "structured_outputs", None)
    if so:
        c = _structured(so)
        if c is not None:
            found.append((c, f"structured_outputs.{'json_object' if c.kind == 'json_object' else c.kind}"))
    for kind in ("json", "regex", "choice", "grammar"):
        value = getattr(body, f"guided_{kind}", None)
        if value is not None:
            found.append((_one(kind, value, f"guided_{kind}"), f"guided_{kind}"))
    if len(found) > 1:
        raise APIError(400, f"{found[0][1]} and {found[1][1]} both constrain the output; give one", param=found[1][1])
    return found[0] if found else (None, None)


async def compiled(served: ServedModel, constraint: Constraint | None, field: str | None) -> Any:
    """The model's compiled grammar for the constraint; a 400 naming the field when it does not compile or the
    model's vocabulary cannot satisfy it. Without a constraint nothing is imported: xgrammar loads (~0.7 s) with
    the first constrained request, never in an unconstrained one's way."""
    if constraint is None:
        return None
    from service.engine.structured import ConstraintError

    try:
        return await served.grammar(constraint)
    except ConstraintError as e:
        raise APIError(400, f"{field}: {e}", param=field, code="invalid_constraint") from e

"""What a new user meets in the first minutes, against a live server: a request without `model` goes to the
language model, not the translator that sorts first; a translator decodes greedily unless told a temperature; a
body without a JSON Content-Type is answered with what to send; /docs lists every operation once."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from support import LiveServer, sse_events

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models on a shared CPU: one thread is faster

SOURCE = "Two dogs play in the snow."


def test_no_model_goes_to_the_language_model(make_server: Callable[..., LiveServer], checkpoints_dir: Path,
                                             tmp_path: Path) -> None:
    # the translator first in the served order (its folder under --models-dir, the LM given with --model): the
    # old rule, "the first model served", picked it
    only_mt = tmp_path / "models"
    only_mt.mkdir()
    (only_mt / "tiny-mt").symlink_to(checkpoints_dir / "tiny-mt")
    s = make_server(models_dir=only_mt, models=[checkpoints_dir / "tiny-gpt"])
    assert list(s.models) == ["tiny-mt", "tiny-gpt"]
    r = httpx.post(f"{s.url}/v1/generate", json={"prompt": "hi", "max_tokens": 2}, timeout=60)
    assert r.status_code == 200 and r.json()["model"] == "tiny-gpt", r.text
    c = httpx.post(f"{s.url}/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=60)
    assert c.json()["model"] == "tiny-gpt"


def test_with_no_language_model_the_first_by_name(make_server: Callable[..., LiveServer], checkpoints_dir: Path,
                                                  tmp_path: Path) -> None:
    only_mt = tmp_path / "models"
    only_mt.mkdir()
    for name in ("zz-mt", "tiny-mt"):
        (only_mt / name).symlink_to(checkpoints_dir / "tiny-mt")
    s = make_server(models_dir=only_mt)
    assert s.app.state.default_model == "tiny-mt"


def _generate(url: str, **body: Any) -> list[int]:
    r = httpx.post(f"{url}/v1/generate", json={"model": "tiny-mt", "prompt": SOURCE, "max_tokens": 12,
                                               "ignore_eos": True, **body}, timeout=60)
    assert r.status_code == 200, r.text
    return list(r.json()["token_ids"])


def _chat_streamed(url: str, **body: Any) -> str:
    payload = {"model": "tiny-mt", "messages": [{"role": "user", "content": SOURCE}], "max_tokens": 12,
               "ignore_eos": True, "stream": True, **body}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=payload, timeout=60) as r:
        assert r.status_code == 200
        events = [data for _, data in sse_events(r.iter_lines()) if data != "[DONE]"]
    return "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e["choices"])


def test_a_translator_decodes_greedily_unless_told(server: LiveServer) -> None:
    greedy = _generate(server.url, temperature=0)
    assert _generate(server.url) == greedy and _generate(server.url) == greedy
    assert _generate(server.url, temperature=None) == greedy  # null is omitted
    # an explicit temperature still wins: random weights sampled at 1 leave the greedy path
    sampled = [_generate(server.url, temperature=1.0, seed=s) for s in (1, 2)]
    assert greedy not in sampled and sampled[0] != sampled[1]
    completion = httpx.post(f"{server.url}/v1/completions", json={"model": "tiny-mt", "prompt": SOURCE,
                                                                   "max_tokens": 12, "ignore_eos": True}, timeout=60)
    text = completion.json()["choices"][0]["text"]
    assert text == httpx.post(f"{server.url}/v1/detokenize", json={"model": "tiny-mt", "tokens": greedy}).json()["text"]
    assert _chat_streamed(server.url) == text == _chat_streamed(server.url, temperature=None)
    # a language model keeps temperature 1: two unseeded samples of 12 tokens differ
    lm = {"model": "tiny-gpt", "prompt": "ROMEO:", "max_tokens": 12, "ignore_eos": True}
    texts = {httpx.post(f"{server.url}/v1/generate", json=lm, timeout=60).json()["text"] for _ in range(3)}
    assert len(texts) > 1


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", None])
def test_a_body_without_a_json_content_type_is_told_what_to_send(server: LiveServer, content_type: str | None) -> None:
    """415 Unsupported Media Type: the body is fine JSON, its declared type is not (curl -d sends the form type)."""
    headers = {"Content-Type": content_type} if content_type else {}
    body = json.dumps({"prompt": "hi", "max_tokens": 2}).encode()
    r = httpx.post(f"{server.url}/v1/generate", content=body, headers=headers, timeout=60)
    assert r.status_code == 415, r.text
    error = r.json()["error"]
    assert "Content-Type: application/json" in error["message"] and "valid dictionary" not in error["message"]
    assert (content_type or "no Content-Type") in error["message"]
    assert error["code"] == "unsupported_media_type" and error["param"] == "body"
    ok = httpx.post(f"{server.url}/v1/generate", content=body, headers={"Content-Type": "application/json"}, timeout=60)
    assert ok.status_code == 200, ok.text


def test_docs_list_every_operation_once(server: LiveServer) -> None:
    """Swagger UI draws an operation once under each of its tags: one tag each, one path each."""
    spec = httpx.get(f"{server.url}/openapi.json").json()
    ops = [(path, op) for path, item in spec["paths"].items() for op in item.values()]
    assert all(len(op.get("tags", [])) == 1 for _, op in ops), [(p, op.get("tags")) for p, op in ops]
    ids = Counter(op["operationId"] for _, op in ops)
    assert max(ids.values()) == 1, ids
    shown = Counter(path for path, op in ops for _ in op["tags"])
    for path in ("/tokenize", "/detokenize", "/v1/tokenize", "/v1/detokenize"):
        assert shown[path] == 1, path
    assert httpx.post(f"{server.url}/tokenize", json={"prompt": "hi"}).json()["count"] == 2
    assert httpx.post(f"{server.url}/v1/tokenize", json={"text": "hi"}).json()["count"] == 2

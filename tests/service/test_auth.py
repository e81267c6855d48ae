"""API keys, CORS, request ids and what the logs hold: who gets in, and what leaves the server."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from service.logs import JsonFormatter


def test_keys_from_env_guard_the_api_but_not_the_probes(make_server: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ATTNSERVE_API_KEYS", '["key-one", "key-two"]')
    s = make_server()
    with httpx.Client(base_url=s.url, timeout=30) as c:
        body = {"prompt": "a", "max_tokens": 2}
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "key-one"},
                        {"Authorization": "Basic key-one"}, {"Authorization": "Bearer  key-one"},
                        {"Authorization": "Bearer key-on"}, {"Authorization": "Bearer key-onee"}):
            r = c.post("/v1/generate", json=body, headers=headers)
            assert r.status_code == 401, (headers, r.text)
            assert r.json()["error"]["type"] == "authentication_error"
            assert r.headers["WWW-Authenticate"] == "Bearer"
            assert "key-one" not in r.text
        for key in ("key-one", "key-two"):
            r = c.post("/v1/generate", json=body, headers={"Authorization": f"Bearer {key}"})
            assert r.status_code == 200, r.text
        assert c.get("/v1/models").status_code == 401
        for open_path in ("/health", "/ready", "/metrics", "/openapi.json"):
            assert c.get(open_path).status_code == 200, open_path


def test_keys_from_a_file_work_with_the_openai_sdk(make_server: Any, tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text("alpha\n\n  beta  \n")
    s = make_server(api_keys_file=keys, metrics_require_auth=True)
    good = openai.OpenAI(base_url=f"{s.url}/v1", api_key="beta", max_retries=0)
    out = good.completions.create(model="tiny-gpt", prompt="ROMEO:", max_tokens=3, temperature=0)
    assert out.usage is not None and out.usage.completion_tokens == 3
    assert [m.id for m in good.models.list()] == ["tiny-gpt", "tiny-mt"]
    with pytest.raises(openai.AuthenticationError) as e:
        openai.OpenAI(base_url=f"{s.url}/v1", api_key="gamma", max_retries=0).completions.create(
            model="tiny-gpt", prompt="a", max_tokens=1)
    assert e.value.status_code == 401
    assert httpx.get(f"{s.url}/metrics").status_code == 401
    assert httpx.get(f"{s.url}/metrics", headers={"Authorization": "Bearer alpha"}).status_code == 200
    assert httpx.get(f"{s.url}/health").status_code == 200


def test_cors_is_off_unless_origins_are_listed(make_server: Any) -> None:
    preflight = {"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"}
    closed = make_server()
    r = httpx.options(f"{closed.url}/v1/generate", headers=preflight)
    assert "access-control-allow-origin" not in r.headers
    r = httpx.get(f"{closed.url}/v1/models", headers={"Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in r.headers
    open_ = make_server(cors_origins=["https://ui.example"])
    r = httpx.options(f"{open_.url}/v1/generate", headers={**preflight, "Origin": "https://ui.example"})
    assert r.headers["access-control-allow-origin"] == "https://ui.example"
    r = httpx.options(f"{open_.url}/v1/generate", headers=preflight)
    assert "access-control-allow-origin" not in r.headers


class Lines(logging.Handler):
    """Collects the service's log lines as the JSON objects it writes."""

    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(JsonFormatter())
        self.lines: list[dict[str, Any]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(json.loads(self.format(record)))

    def access(self, request_id: str) -> dict[str, Any]:
        """The access line of a request; written once its body is out, so maybe just after the client has it."""
        end = time.monotonic() + 5
        while time.monotonic() < end:
            found = [x for x in self.lines if x["msg"] == "request" and x.get("request_id") == request_id]
            if found:
                return found[0]
            time.sleep(0.01)
        raise AssertionError(f"no access log line for {request_id}")


@pytest.fixture
def lines() -> Iterator[Lines]:
    handler = Lines()
    logger = logging.getLogger("attnserve")
    logger.addHandler(handler)
    yield handler
    logger.removeHandler(handler)


def test_request_ids_and_access_log_lines(make_server: Any, lines: Lines) -> None:
    s = make_server(log_level="info")
    secret = "my secret prompt"
    with httpx.Client(base_url=s.url, timeout=30) as c:
        r = c.post("/v1/generate", json={"prompt": secret, "max_tokens": 3, "ignore_eos": True},
                   headers={"X-Request-ID": "abc-123"})
        assert r.headers["X-Request-ID"] == "abc-123"
        two = {"prompt": secret, "max_tokens": 4, "n": 2, "stream": True, "ignore_eos": True}
        with c.stream("POST", "/v1/completions", json=two, headers={"X-Request-ID": "stream-1"}) as st:
            assert st.headers["X-Request-ID"] == "stream-1"
            assert st.read().endswith(b"data: [DONE]\n\n")
        twice = c.post("/v1/completions", json={"prompt": ["ab", "ab"], "n": 3, "max_tokens": 2},
                       headers={"X-Request-ID": "twice-1"}).json()
        generated = c.post("/v1/generate", json={"prompt": "x", "max_tokens": 2})
        assert len(generated.headers["X-Request-ID"]) == 32  # made up when the client sends none
        assert c.post("/v1/generate", json={"prompt": 5}, headers={"X-Request-ID": "bad-1"}).status_code == 400
    line = lines.access("abc-123")
    assert line["status"] == 200 and line["path"] == "/v1/generate" and line["model"] == "tiny-gpt"
    assert line["latency_ms"] > 0 and line["prompt_tokens"] == len(secret) and line["completion_tokens"] == 3
    line = lines.access("stream-1")  # written when the stream ended, so it has the tokens of both choices
    assert line["completion_tokens"] == 8 and line["prompt_tokens"] == len(secret)  # one prompt, as usage says
    line = lines.access("twice-1")  # two prompts (equal texts still count twice), 3 choices each
    assert twice["usage"]["prompt_tokens"] == 4 == line["prompt_tokens"]
    assert twice["usage"]["completion_tokens"] == line["completion_tokens"]
    assert lines.access(generated.headers["X-Request-ID"])["status"] == 200
    assert lines.access("bad-1")["status"] == 400
    assert not any(secret in json.dumps(x) for x in lines.lines)  # prompts stay out of the logs by default


def test_prompts_are_logged_only_when_asked(make_server: Any, lines: Lines) -> None:
    s = make_server(log_prompts=True, log_level="info")
    httpx.post(f"{s.url}/v1/generate", json={"prompt": "log me", "max_tokens": 2}, headers={"X-Request-ID": "p-1"})
    assert lines.access("p-1")["prompt"] == "log me"


def test_no_trace_or_path_reaches_a_client(make_server: Any, checkpoints_dir: Path) -> None:
    s = make_server()

    def explode(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(f"secret detail from {checkpoints_dir}/tiny-gpt/model.safetensors")

    s.models["tiny-gpt"].tokenizer.encode = explode  # a bug inside the service, reached by a normal request
    r = httpx.post(f"{s.url}/v1/generate", json={"prompt": "a"})
    assert r.status_code == 500
    assert r.json() == {"error": {"message": "internal server error", "type": "server_error", "param": None,
                                  "code": None}}
    assert str(checkpoints_dir) not in r.text

"""The service starts on a real port and answers the basic surfaces."""

import httpx


def test_ready_models_and_generate(server) -> None:
    assert httpx.get(f"{server.url}/ready").status_code == 200
    names = [m["id"] for m in httpx.get(f"{server.url}/v1/models").json()["data"]]
    assert names == ["tiny-gpt", "tiny-mt"]
    r = httpx.post(f"{server.url}/v1/generate", json={"prompt": "ROMEO:", "max_tokens": 5, "temperature": 0})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 5

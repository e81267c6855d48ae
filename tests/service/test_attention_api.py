"""POST /v1/attention and /v1/generate's return_attention on a live server: equal to Hugging Face GPT-2's
output_attentions on the same weights, streamed rows equal to the teacher-forced inspection, limits, errors."""

from __future__ import annotations

import asyncio
import json
import re
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from support import read_sse
from transformers import GPT2Config, GPT2LMHeadModel

from model.tokenizer import Tokenizer
from service.inspection.encoding import decode_array

TEXTS = ["the quick brown fox jumps over the lazy dog\n", "attention is all you need; über naïve\n"] * 20
TIMEOUT = 60.0  # the first PNG imports matplotlib


def post(server: Any, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/attention", json=body, timeout=TIMEOUT)


def dense(m: dict[str, Any]) -> np.ndarray:
    """A map's weights as float64 (H, T_q, T_k), masked cells NaN, from either encoding."""
    if m.get("data") is not None:
        a = decode_array(m["data"]).astype(np.float64)
        if m["causal"]:
            _, t_q, t_k = m["shape"]
            q = m["query_start"] + np.arange(t_q)
            a[:, np.arange(t_k)[None, :] > q[:, None]] = np.nan
        return a
    return np.array([[[np.nan if v is None else v for v in row] for row in head] for head in m["weights"]])


@pytest.fixture(scope="module")
def gpt2_models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding one random tiny GPT-2 saved by transformers, with a byte-level BPE tokenizer.json."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("hf-models")
    cfg = GPT2Config(vocab_size=300, n_positions=64, n_embd=64, n_layer=2, n_head=4, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0, initializer_range=0.2)
    GPT2LMHeadModel(cfg).save_pretrained(root / "gpt2-tiny")
    Tokenizer.train_bpe(TEXTS, vocab_size=300).save(root / "gpt2-tiny" / "tokenizer.json")
    return root


def test_model_card_describes_attention(server: Any) -> None:
    mt = httpx.get(f"{server.url}/v1/models/tiny-mt").json()["details"]
    assert mt["architecture"] == "encoder-decoder" and mt["heads"] == 4
    kinds = mt["attention"]["kinds"]
    assert {k: (v["layers"], v["heads"], v["causal"]) for k, v in kinds.items()} == {
        "encoder_self": (2, 4, False), "decoder_self": (2, 4, True), "cross": (2, 4, False)}
    assert mt["attention"]["limits"] == {"max_tokens": 512, "max_values": 2_000_000}
    gpt = httpx.get(f"{server.url}/v1/models/tiny-gpt").json()["details"]["attention"]["kinds"]
    assert list(gpt) == ["decoder_self"] and gpt["decoder_self"]["causal"] is True


def test_attention_equals_hugging_face_output_attentions(make_server: Callable[..., Any],
                                                          gpt2_models_dir: Path) -> None:
    server = make_server(models_dir=gpt2_models_dir)
    prompt = "the lazy dog jumps over the quick brown fox"
    hf = GPT2LMHeadModel.from_pretrained(gpt2_models_dir / "gpt2-tiny", attn_implementation="eager").eval()
    for encoding, tol in (("json", 1e-5), ("base64", 2e-3)):
        r = post(server, {"model": "gpt2-tiny", "prompt": prompt, "encoding": encoding, "precision": 7})
        assert r.status_code == 200, r.text
        body = r.json()
        ids = [t["id"] for t in body["decoder_tokens"]]
        assert len(ids) > 5 and "".join(t["text"] for t in body["decoder_tokens"]) == prompt
        assert all(prompt[t["start"]:t["end"]] == t["text"] for t in body["decoder_tokens"])
        with torch.no_grad():
            expected = hf(torch.tensor([ids]), output_attentions=True).attentions  # per layer (1, h, T, T)
        assert [m["layer"] for m in body["maps"]] == [0, 1]
        for m in body["maps"]:
            got, ref = dense(m), expected[m["layer"]][0].double().numpy()
            masked = np.isnan(got)
            assert np.array_equal(masked, np.triu(np.ones_like(ref, dtype=bool), 1)), "exactly the causal cells"
            assert np.abs(got[~masked] - ref[~masked]).max() < tol, (encoding, m["layer"])
            assert np.allclose(ref[masked], 0.0)
            assert ref.max() > 0.3


async def _stream_rows(url: str, body: dict[str, Any]) -> tuple[list[int], list[dict[str, Any]]]:
    ids, rows = [], []
    async with httpx.AsyncClient(timeout=TIMEOUT) as client, client.stream("POST", f"{url}/v1/generate",
                                                                           json=body) as r:
        assert r.status_code == 200, await r.aread()
        for event, data in await read_sse(r):
            if event == "token" and "token_id" in data:  # not a text-only event (the detokenizer's tail)
                ids.append(data["token_id"])
                rows.append(data["attention"])
    return ids, rows


async def _with_neighbour(url: str, body: dict[str, Any], other: dict[str, Any]) -> tuple[list[int], list[dict]]:
    """Stream `body` while another request without attention shares the batches (padding, other lengths)."""
    async with httpx.AsyncClient(timeout=TIMEOUT) as client:
        neighbour = asyncio.ensure_future(client.post(f"{url}/v1/generate", json=other))
        result = await _stream_rows(url, body)
        assert (await neighbour).status_code == 200
    return result


@pytest.mark.parametrize("model,text,kinds", [("tiny-gpt", "ROMEO: But soft", ["decoder_self"]),
                                              ("tiny-mt", "Two dogs play in the snow.", ["decoder_self", "cross"])])
def test_streamed_rows_equal_the_teacher_forced_inspection(server: Any, model: str, text: str,
                                                           kinds: list[str]) -> None:
    sampling = {"model": model, "prompt": text, "max_tokens": 6, "temperature": 0, "ignore_eos": True}
    spec = {"kinds": kinds, "aggregation": "none"}
    other = {"model": model, "prompt": "JULIET: O Romeo, Romeo, wherefore", "max_tokens": 8, "ignore_eos": True}
    ids, rows = asyncio.run(_with_neighbour(server.url, {**sampling, "stream": True, "return_attention": spec}, other))
    assert len(ids) == 6
    r = post(server, {**sampling, "generate": True, "kinds": kinds, "encoding": "json", "precision": 8})
    assert r.status_code == 200, r.text
    body = r.json()
    decoder = [t["id"] for t in body["decoder_tokens"]]
    assert body["generated_tokens"] == 6 and decoder[-6:] == ids, "greedy generation is the same both times"
    assert [t["generated"] for t in body["decoder_tokens"]] == [False] * (len(decoder) - 6) + [True] * 6
    maps = {(m["kind"], m["layer"]): dense(m) for m in body["maps"]}
    first_query = len(decoder) - 7  # the last prompt position predicts the first generated token
    for n, row in enumerate(rows):
        assert row["query_position"] == first_query + n and row["layers"] == [0, 1] and row["heads"] == [0, 1, 2, 3]
        for kind in kinds:
            streamed = np.array(row[kind])  # (layers, heads, T_k)
            for layer in (0, 1):
                expected = maps[(kind, layer)][:, row["query_position"]]
                if kind == "decoder_self":
                    expected = expected[:, : row["query_position"] + 1]
                assert streamed[layer].shape == expected.shape
                assert np.abs(streamed[layer] - expected).max() < 1e-5, (kind, layer, n)


def test_streamed_rows_aggregate_over_the_chosen_heads(server: Any) -> None:
    body = {"model": "tiny-gpt", "prompt": "ROMEO:", "max_tokens": 3, "temperature": 0, "ignore_eos": True,
            "stream": True, "return_attention": {"layers": [1], "heads": [1, 3], "aggregation": "max"}}
    _, rows = asyncio.run(_stream_rows(server.url, body))
    per_head = asyncio.run(_stream_rows(server.url, {**body, "return_attention": {"layers": [1], "aggregation": "none"}}))[1]
    for agg, full in zip(rows, per_head, strict=True):
        assert agg["heads"] == [1, 3] and np.array(agg["decoder_self"]).shape == (1, 1, agg["query_position"] + 1)
        assert np.allclose(agg["decoder_self"][0][0], np.array(full["decoder_self"][0])[[1, 3]].max(0), atol=1e-6)


def test_limits_answer_413_with_a_selection_that_fits(make_server: Callable[..., Any]) -> None:
    server = make_server(inspect_max_tokens=24, inspect_max_values=500)
    long = post(server, {"model": "tiny-gpt", "prompt": "x" * 30})
    assert long.status_code == 413
    assert "inspect_max_tokens) is 24" in long.json()["error"]["message"]
    gen = post(server, {"model": "tiny-gpt", "prompt": "ROMEO:", "generate": True, "max_tokens": 40, "layers": [0],
                        "heads": [0]})
    message = gen.json()["error"]["message"]
    assert gen.status_code == 413 and "lower max_tokens to 18" in message, message
    many = post(server, {"model": "tiny-gpt", "prompt": "ROMEO: But soft, what"})
    message = many.json()["error"]["message"]
    assert many.status_code == 413 and "inspect_max_values) is 500" in message, message
    dry = post(server, {"model": "tiny-gpt", "prompt": "ROMEO: But soft, what", "dry_run": True}).json()
    assert dry["within_limits"] is False and dry["values"] == 2 * 4 * 21 * 21 and dry["message"] == message
    smaller = json.loads(re.search(r"(\{.*\})", message).group(1))  # type: ignore[union-attr]
    ok = post(server, {"model": "tiny-gpt", "prompt": "ROMEO: But soft, what", **smaller})
    assert ok.status_code == 200, ok.text
    assert 0 < ok.json()["values"] <= 500
    stream = httpx.post(f"{server.url}/v1/generate", json={"model": "tiny-gpt", "prompt": "ROMEO:", "max_tokens": 30,
                                                           "stream": True, "return_attention": {}}, timeout=TIMEOUT)
    assert stream.status_code == 413 and "inspect_max_tokens" in stream.json()["error"]["message"]


@pytest.mark.parametrize("body,status,words", [
    ({"model": "tiny-gpt", "prompt": "ab", "layers": [2]}, 400, "out of range for decoder_self"),
    ({"model": "tiny-gpt", "prompt": "ab", "heads": [-1]}, 400, "head -1 is out of range"),
    ({"model": "tiny-gpt", "prompt": "ab", "kinds": ["cross"]}, 400, "does not exist"),
    ({"model": "tiny-gpt", "prompt": "ab", "kinds": ["sideways"]}, 400, "kinds"),
    ({"model": "tiny-gpt", "prompt": "ab", "queries": {"start": 5}}, 400, "select no position"),
    ({"model": "tiny-gpt", "source": "ab"}, 400, "decoder-only"),
    ({"model": "tiny-mt", "source": "ab", "kinds": ["cross"], "aggregation": "rollout"}, 400, "rollout"),
    ({"model": "tiny-mt", "target": "ab"}, 400, "source"),
    ({"model": "tiny-gpt", "prompt": "ab", "sparsify": {"top_k": 2, "threshold": 0.1}}, 400, "exactly one"),
    ({"model": "tiny-gpt", "prompt": "ab", "stream": True}, 400, "stream"),
    ({"model": "nope", "prompt": "ab"}, 404, "does not exist"),
])
def test_bad_selections_are_refused(server: Any, body: dict[str, Any], status: int, words: str) -> None:
    r = post(server, body)
    assert r.status_code == status, r.text
    assert words in r.json()["error"]["message"]


def test_bad_stream_specs_are_refused(server: Any) -> None:
    base = {"model": "tiny-gpt", "prompt": "ab", "max_tokens": 2}
    no_stream = httpx.post(f"{server.url}/v1/generate", json={**base, "return_attention": {}})
    assert no_stream.status_code == 400 and "stream: true" in no_stream.json()["error"]["message"]
    for spec, param in (({"layers": [9]}, "return_attention.layers"), ({"kinds": ["cross"]}, "return_attention.kinds")):
        r = httpx.post(f"{server.url}/v1/generate", json={**base, "stream": True, "return_attention": spec})
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def test_sparse_base64_stats_and_query_range_agree_with_dense(server: Any) -> None:
    common = {"model": "tiny-mt", "source": "Two dogs play in the snow.", "target": "Zwei Hunde", "layers": [1],
              "queries": {"start": 2, "end": 6}, "precision": 8}
    full = post(server, {**common, "stats": True}).json()
    sparse = post(server, {**common, "sparsify": {"top_k": 3}, "encoding": "base64"}).json()
    assert full["values"] == sum(int(np.prod(m["shape"])) for m in full["maps"])
    for d, s in zip(full["maps"], sparse["maps"], strict=True):
        w = dense(d)
        assert (d["query_start"], d["query_end"]) == (2, 6) and w.shape[1] == 4
        assert [st["head"] for st in d["stats"]] == [0, 1, 2, 3]
        probs = np.nan_to_num(w)
        entropy = -(probs * np.log(np.where(probs > 0, probs, 1))).sum(-1).mean(-1)
        assert np.allclose([st["entropy"] for st in d["stats"]], entropy, atol=1e-5)
        ptr, idx = decode_array(s["sparse"]["row_ptr"]), decode_array(s["sparse"]["indices_data"])
        vals = decode_array(s["sparse"]["values_data"]).astype(np.float64)
        for r in range(w.shape[0] * w.shape[1]):
            a, i = divmod(r, w.shape[1])
            row = probs[a, i]
            assert sorted(idx[ptr[r]:ptr[r + 1]].tolist()) == sorted(np.argsort(-row)[:3].tolist())
            assert np.allclose(vals[ptr[r]:ptr[r + 1]], row[idx[ptr[r]:ptr[r + 1]]], atol=1e-3)
            assert abs(s["sparse"]["kept_mass"][a][i] - np.sort(row)[-3:].sum()) < 1e-5
    assert sparse["values"] == sum(int(np.prod(m["shape"][:2])) * 3 for m in sparse["maps"])


def test_rollout_over_http_equals_rollout_of_the_returned_heads(server: Any) -> None:
    common = {"model": "tiny-mt", "source": "Two dogs play in the snow.", "kinds": ["encoder_self"], "precision": 8}
    heads = post(server, common).json()["maps"]
    rolled = post(server, {**common, "aggregation": "rollout", "layers": [1]}).json()["maps"]
    a = [dense(m).mean(0) + np.eye(dense(m).shape[-1]) for m in heads]
    a = [x / x.sum(-1, keepdims=True) for x in a]
    assert len(rolled) == 1 and rolled[0]["aggregation"] == "rollout"
    assert np.abs(dense(rolled[0])[0] - a[1] @ a[0]).max() < 1e-5


def test_png_heatmaps(server: Any) -> None:
    def size(png: bytes) -> tuple[int, int]:
        assert png[:8] == b"\x89PNG\r\n\x1a\n"
        return struct.unpack(">II", png[16:24])

    one = post(server, {"model": "tiny-mt", "source": "Two dogs", "target": "Zwei Hunde", "kinds": ["cross"],
                        "layers": [1], "aggregation": "mean", "format": "png"})
    assert one.status_code == 200 and one.headers["content-type"] == "image/png"
    grid = post(server, {"model": "tiny-gpt", "prompt": "ROMEO: hi", "format": "png"})
    assert grid.status_code == 200
    (w1, h1), (w2, h2) = size(one.content), size(grid.content)
    assert w1 > 400 and h1 > 400 and w1 < 1.5 * h1, "one heatmap with its labels and colorbar"
    assert w2 > 1.5 * h2, "2 layers x 4 heads: a wide grid"


def test_dry_run_reports_size_without_computing(server: Any) -> None:
    body = {"model": "tiny-mt", "source": "Two dogs play", "generate": True, "max_tokens": 10, "dry_run": True,
            "encoding": "base64"}
    dry = post(server, body).json()
    assert dry["dry_run"] is True and dry["within_limits"] is True and dry["decoder_tokens"] == 11
    n_src = dry["encoder_tokens"]
    assert dry["values"] == 2 * 4 * (n_src * n_src + 11 * 11 + 11 * n_src)
    assert dry["estimated_bytes"] >= dry["values"] * 2

"""llama.cpp's llama-server as `make bench`'s peer: the plan's flag, its command line, the OpenAI stream as
llama.cpp sends it (usage in the chunk that ends the stream) counted right, the summary's ratios, a peer that
cannot be built; and, where the binaries are in the cache (`python -m benchmarks.llama_cpp build`; CI never
builds them), a tiny GPT-2 folder converted to F32 GGUF whose greedy tokens on llama-server equal our
reference decoder's, and the load generator's counts on it."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import aiohttp
import httpx
import pytest
import torch
from aiohttp import web
from tokenizers import pre_tokenizers

import benchmarks.llama_peer
from benchmarks import llama_cpp
from benchmarks.gguf_convert import BYTE_ALPHABET
from benchmarks.llama_peer import peer_setup, server_cmd
from benchmarks.plan import Plan, arguments, plan_from_args
from benchmarks.report import peer_table
from benchmarks.run_cpu import free_port, running
from benchmarks.serve_bench import LoadSpec, Prompt, run_sweep
from benchmarks.serve_client import send_openai

pytestmark = pytest.mark.timeout(300)


def test_the_peer_is_on_by_default_on_cpu_and_off_by_flag_or_on_cuda() -> None:
    assert plan_from_args(arguments("").parse_args([])).llama_cpp
    assert not plan_from_args(arguments("").parse_args(["--no-llama-cpp"])).llama_cpp
    assert not plan_from_args(arguments("").parse_args(["--device", "cuda"])).llama_cpp  # a CPU-only build


def test_server_command_has_a_slot_per_stream_and_the_rows_kv_precision() -> None:
    cmd = server_cmd(Path("/x/llama-server"), Path("m.gguf"), "f32", 8080, Plan(threads=2))
    arg = {k: v for k, v in zip(cmd, [*cmd[1:], ""], strict=True) if k.startswith("-")}
    assert arg["--parallel"] == "32" and "--cont-batching" in cmd and arg["-t"] == "2"
    assert int(arg["-c"]) == 32 * 256 >= 32 * (32 + 128)  # split evenly: each slot holds prompt + output
    assert (arg["--cache-type-k"], arg["--cache-type-v"]) == ("f32", "f32")
    assert "--no-cache-prompt" in cmd and arg["--cache-ram"] == "0"  # no request reuses another's work
    q8 = server_cmd(Path("s"), Path("m.gguf"), "q8_0", 1, Plan(output_len=64, concurrency=(1, 32)))
    assert q8[q8.index("--cache-type-k") + 1] == "f16" and q8[q8.index("-c") + 1] == str(32 * 256)


def test_byte_alphabet_is_gpt2s() -> None:
    assert len(set(BYTE_ALPHABET.values())) == 256
    assert set(BYTE_ALPHABET.values()) == set(pre_tokenizers.ByteLevel.alphabet())
    assert (BYTE_ALPHABET[ord(" ")], BYTE_ALPHABET[ord("\n")], BYTE_ALPHABET[ord("a")]) == ("Ġ", "Ċ", "a")


def _chunk(text: str, finish: str | None = None, **extra: object) -> bytes:
    body = {"choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish}],
            "object": "text_completion", **extra}
    return f"data: {json.dumps(body)}\n\n".encode()


async def _stream(chunks: list[bytes]) -> tuple[object, ...]:
    async def completions(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for c in [*chunks, b"data: [DONE]\n\n"]:
            await resp.write(c)
            await asyncio.sleep(0.002)
        return resp

    app = web.Application()
    app.router.add_post("/v1/completions", completions)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        async with aiohttp.ClientSession() as client:
            spec = LoadSpec(f"http://127.0.0.1:{port}", "m", "openai", input_len=3, output_len=6)
            r = await send_openai(client, spec, Prompt("", [1, 2, 3]), 0)
    finally:
        await runner.cleanup()
    return r.ok, r.output_tokens, r.prompt_tokens, len(r.itls), r.error


def test_llama_cpp_stream_is_counted_by_its_usage_and_its_last_chunk_is_no_token() -> None:
    usage = {"completion_tokens": 6, "prompt_tokens": 3, "total_tokens": 9}
    # two tokens in one chunk (a character split over two byte tokens), then the chunk that only ends the stream
    llama = [_chunk("a"), _chunk("b"), _chunk("é"), _chunk("c"), _chunk("d"),
             _chunk("", "length", usage=usage, timings={"predicted_n": 6})]
    assert asyncio.run(_stream(llama)) == (True, 6, 3, 4, "")  # 5 token chunks: 4 gaps
    no_usage = [*llama[:-1], _chunk("", "length", timings={"predicted_n": 6})]
    assert asyncio.run(_stream(no_usage))[:2] == (True, 6)
    vllm = [*(_chunk(t) for t in "abcde"), _chunk("f", "length"),
            f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n".encode()]
    assert asyncio.run(_stream(vllm)) == (True, 6, 3, 5, "")


def _row(model: str, dtype: str, ours: dict[int, float], peer: dict[int, float] | None, **more: object) -> dict:
    row: dict = {"model": model, "dtype": dtype,
                 "ours": {"levels": [{"concurrency": c, "output_throughput": v} for c, v in ours.items()]}}
    if peer is not None:
        row["llama_cpp"] = {"precision": "F32", "kv_cache": "f32", "gguf": "m-f32.gguf", **more,
                            "levels": [{"concurrency": c, "output_throughput": v} for c, v in peer.items()]}
    return row


def test_summary_states_ours_over_llama_cpp_at_1_and_32_streams() -> None:
    runs = [_row("gpt2-small", "float32", {1: 20.0, 8: 80.0, 32: 150.0}, {1: 40.0, 8: 90.0, 32: 100.0}),
            _row("smollm2-135m", "float32", {1: 20.0, 32: 150.0}, None),
            {**_row("smollm2-135m", "bfloat16", {1: 20.0, 32: 150.0}, None), "llama_cpp": {"skipped": "why"}}]
    text = peer_table(runs, 32)
    assert text is not None
    assert "| ours / llama.cpp c=1 | ours / llama.cpp c=32 |" in text
    assert "| gpt2-small | float32 | F32 (KV f32) | 40.0 | 90.0 | 100 | 0.50x | 1.50x | m-f32.gguf |" in text
    assert "| smollm2-135m | bfloat16 | - | - | - | - | - | - | not measured: why |" in text
    assert peer_table([_row("m", "float32", {1: 1.0}, None)], 32) is None  # --no-llama-cpp: no table


def test_a_peer_that_cannot_be_built_is_left_out_with_one_message(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_compiler(*args: object, **kwargs: object) -> Path:
        raise llama_cpp.Unavailable("cannot build llama.cpp: cmake, c++ not found")

    monkeypatch.setattr(llama_cpp, "ensure", no_compiler)
    monkeypatch.setattr(benchmarks.llama_peer, "int8_missing", lambda: "no --quantization")
    skipped: list[str] = []
    plan = peer_setup(Plan(), dtypes_given=False, skipped=skipped)
    assert not plan.llama_cpp and plan.dtypes == ("float32", "bfloat16")
    assert len(skipped) == 2 and "no --quantization" in skipped[0]
    assert skipped[1].startswith("llama.cpp server: cannot build llama.cpp: cmake, c++ not found")
    monkeypatch.setattr(benchmarks.llama_peer, "int8_missing", lambda: None)
    assert peer_setup(Plan(llama_cpp=False), dtypes_given=False, skipped=[]).dtypes[-1] == "int8"


# --- against the real llama-server (only where it is built) -----------------------------------------------------

built = pytest.mark.skipif(not llama_cpp.built(), reason=f"llama-server is not in the cache ({llama_cpp.bin_dir()}); "
                           "`python -m benchmarks.llama_cpp build` builds it once")


@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Our tiny GPT-2-shaped checkpoint (tanh GELU and a 4 x d_model FFN, as llama.cpp's GPT-2 graph has; the
    matrices scaled up 5x so that greedy decoding does not settle on one repeated token) and its GPT-2 folder."""
    from support import CORPUS

    from model.checkpoint import export_gpt2, save_checkpoint
    from model.config import preset
    from model.tokenizer import Tokenizer
    from model.transformer import build_model

    root = tmp_path_factory.mktemp("llama-cpp")
    torch.manual_seed(0)
    tok = Tokenizer.train_char(CORPUS)
    model = build_model(preset("tiny-gpt", vocab_size=tok.vocab_size, max_len=128, activation="gelu_tanh", d_ff=128))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(5.0)
    ours = save_checkpoint(model, tok, root / "tiny-gpt2")
    return ours, export_gpt2(model.eval(), tok, root / "tiny-gpt2-hf")  # type: ignore[arg-type]


@pytest.mark.slow
@built
def test_llama_server_greedy_tokens_equal_ours_on_the_f32_file(tiny_gpt2: tuple[Path, Path], tmp_path: Path) -> None:
    from model.checkpoint import load_checkpoint
    from model.generate import GenerationConfig, generate

    ours, folder = tiny_gpt2
    gguf = llama_cpp.convert(folder, "f32", tmp_path / "tiny-f32.gguf")
    ref = load_checkpoint(ours)
    prompt = ref.tokenizer.encode("ROMEO: But soft")
    want = generate(ref.model.eval(), prompt, GenerationConfig(max_new_tokens=24, eos_id=ref.tokenizer.eos_id))
    assert len(set(want)) > 4, want  # a real check: not one token repeated
    port = free_port()
    cmd = server_cmd(llama_cpp.bin_dir() / "llama-server", gguf, "f32", port, Plan(concurrency=(2,), threads=1))
    with running(cmd, port, tmp_path / "llama-server.log", timeout=60, ready="/health") as url:
        got = httpx.post(f"{url}/completion", json={"prompt": prompt, "n_predict": 24, "temperature": 0,
                                                    "return_tokens": True}, timeout=60).json()
        assert got["tokens"] == want
        assert got["content"] == ref.tokenizer.decode(want)  # the vocabulary as llama.cpp decodes it
        spec = LoadSpec(url, "tiny-gpt2-hf", "openai", input_len=8, output_len=12)
        prompts = [Prompt("", [(7 * i + j) % 40 + 4 for j in range(8)]) for i in range(5)]
        res = asyncio.run(run_sweep(spec, [2], [4], progress=False, prompts=prompts))
    (level,) = res["levels"]
    assert (level["completed"], level["failed"], level["total_output_tokens"]) == (4, 0, 4 * 12), level["errors"]
    assert level["total_input_tokens"] == 4 * 8 and level["median_itl_ms"] > 0

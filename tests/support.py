"""Test support: random-weight checkpoints, settings for tests, live servers on 127.0.0.1 (a uvicorn thread or the
real `python -m service` process), a free port, one Server-Sent Events parser and a way to slow an engine down."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import httpx
import torch
import uvicorn

from benchmarks.run_cpu import free_port  # one copy: the benchmarks start servers on free ports too
from model.checkpoint import save_checkpoint
from model.config import preset
from model.tokenizer import Tokenizer
from model.transformer import build_model
from service.app import create_app
from service.settings import Settings

CORPUS = (
    "ROMEO: But soft, what light through yonder window breaks? It is the east, and Juliet is the sun.\n"
    "JULIET: O Romeo, Romeo, wherefore art thou Romeo? Deny thy father and refuse thy name.\n"
    "Zwei Hunde spielen im Schnee. Two dogs play in the snow. Ein Mann fährt Fahrrad. A man rides a bike.\n"
)


ROOT = Path(__file__).resolve().parent.parent


def tiny_gpt(folder: Path, max_len: int = 128, **overrides: Any) -> Path:
    """A char-level tiny-gpt of context max_len (and any other preset overrides), random weights, seed 0, saved in
    folder."""
    torch.manual_seed(0)
    char = Tokenizer.train_char(CORPUS)
    model = build_model(preset("tiny-gpt", vocab_size=char.vocab_size, max_len=max_len, **overrides))
    return save_checkpoint(model, char, folder)


def make_checkpoints(root: Path) -> Path:
    """tiny-gpt (char-level decoder-only) and tiny-mt (BPE encoder-decoder), random weights, seed 0."""
    tiny_gpt(root / "tiny-gpt")
    bpe = Tokenizer.train_bpe([CORPUS] * 4, vocab_size=300)
    mt = build_model(preset("tiny-seq2seq", vocab_size=bpe.vocab_size, max_len=128, share_embeddings=True))
    save_checkpoint(mt, bpe, root / "tiny-mt")
    return root


def random_gpt2(folder: Path) -> Path:
    """A random GPT-2 saved by transformers, with a byte-level BPE tokenizer.json whose last id is GPT-2's
    <|endoftext|> (its EOS)."""
    import transformers

    torch.manual_seed(0)
    tok = Tokenizer.train_bpe([CORPUS] * 8, vocab_size=511)
    tok.tok.add_special_tokens(["<|endoftext|>"])
    eos = tok.tok.token_to_id("<|endoftext|>")
    cfg = transformers.GPT2Config(vocab_size=512, n_positions=512, n_embd=64, n_layer=2, n_head=4,
                                  initializer_range=0.2, bos_token_id=eos, eos_token_id=eos)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(folder)
    tok.save(folder / "tokenizer.json")
    return folder


class LiveServer:
    """A real uvicorn server on a free loopback port, in a background thread."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.app = create_app(settings)
        self.port = free_port()
        config = uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("server did not start")
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{self.port}"

    @property
    def models(self) -> dict[str, Any]:
        return self.app.state.models  # type: ignore[no-any-return]

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def settings_for(models_dir: Path, **overrides: Any) -> Settings:
    """Test settings: the engine on a thread of the test process (tests look inside it) unless overridden."""
    base: dict[str, Any] = dict(models_dir=models_dir, device="cpu", dtype="float32", kv_cache_blocks=256,
                                block_size=4, log_level="warning", drain_timeout=5.0, engine_in_process=True)
    base.update(overrides)
    return Settings(**base)


class ServiceProcess:
    """`python -m service` on a free loopback port, its output (stdout and stderr) in a file."""

    def __init__(self, models_dir: Path, log: Path, *args: str, wait: bool = True) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        env = {**os.environ, "ATTNSERVE_BLOCK_SIZE": "4", "ATTNSERVE_KV_CACHE_BLOCKS": "512",
               "ATTNSERVE_LOG_LEVEL": "info"}
        with log.open("wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "service", "--models-dir", str(models_dir), "--port", str(self.port),
                 "--dtype", "float32", "--device", "cpu", *args], cwd=ROOT, env=env, stdout=out,
                stderr=subprocess.STDOUT)
        if wait:
            self.wait_ready()

    def wait_ready(self, timeout: float = 120) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            assert self.proc.poll() is None, self.output()
            try:
                if httpx.get(f"{self.url}/ready", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise AssertionError("server did not become ready")

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def sse_events(lines: Iterable[str]) -> Iterator[tuple[str, Any]]:
    """(event, data) per Server-Sent Event from a text/event-stream's lines, lazily: the event name ("message"
    when none is given) and the JSON data, or the raw text where it is not JSON (OpenAI's "[DONE]")."""
    event = "message"
    for line in lines:
        if line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            data = line[5:].strip()
            yield event, data if data == "[DONE]" else json.loads(data)
        elif line == "":
            event = "message"


async def read_sse(resp: httpx.Response) -> list[tuple[str, Any]]:
    """An async response's events, read to its end."""
    return list(sse_events([line async for line in resp.aiter_lines()]))


def slow_steps(engine: Any, seconds: float) -> None:
    """Sleep before each engine step (its public per-iteration method), so that a long request takes long enough
    for a client to leave, a queue to fill or a deadline to pass in the middle. One step per iteration: a decode
    burst (service/engine/burst.py) would run several steps after one sleep."""
    engine.burst.enabled = False
    step = engine.step

    def slow() -> None:
        time.sleep(seconds)
        step()

    engine.step = slow


async def stream_completion(url: str, body: dict[str, Any], started: asyncio.Event) -> tuple[list[str], float]:
    """A streamed /v1/completions: its SSE data lines (set `started` at the first) and when it ended."""
    async with httpx.AsyncClient(timeout=30) as client, client.stream("POST", url + "/v1/completions",
                                                                       json=body) as r:
        events: list[str] = []
        async for line in r.aiter_lines():
            if line.startswith("data:"):
                events.append(line[5:].strip())
                started.set()
        return events, time.monotonic()


def run_engine(served: Any, prompts: list[str], params: list[Any]) -> list[list[int]]:
    """Each prompt as a request of its params through a served model's engine, all at once: their output token
    ids (each must end by length or stop)."""

    async def one(i: int, prompt: str) -> list[int]:
        async with served.engine.open(served.make_request(f"r{i}", prompt, params[i])) as stream:
            outs = [o async for o in stream]
        assert outs[-1].finish_reason in ("length", "stop"), outs[-1]
        return [o.token_id for o in outs if o.token_id is not None]

    async def main() -> list[list[int]]:
        return list(await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts))))

    return asyncio.run(main())

"""The naive baseline server: FastAPI + Hugging Face transformers `generate()`, one request at a time.

    python -m benchmarks.naive_server --model HF_FOLDER --name shakespeare-gpt --dtype float32 --port 8001

It loads the GPT-2 export of one of our checkpoints (`model.checkpoint.export_gpt2`), or the Llama folder of
SmolLM2's dequantized GGUF (benchmarks.checkpoints.export_hf), with `AutoModelForCausalLM`, so the weights are
identical, and speaks the same API as the service (native /v1/generate with SSE `token`
and `done` events, OpenAI /v1/completions with `data:` chunks and [DONE], /v1/models, /v1/tokenize,
/v1/detokenize, /ready), so the same load generator measures both. Requests queue on a lock: this is what
wrapping `generate()` in a web framework gives without batching. Each generated token is streamed as
generate() produces it, through a streamer called on generate()'s thread."""

from __future__ import annotations

import argparse
import asyncio
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import torch
import uvicorn
from fastapi import FastAPI, HTTPException
from fastapi.responses import JSONResponse, StreamingResponse
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM, StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from benchmarks.hf_static import eos_id
from service.schemas import (
    CompletionRequest,
    DetokenizeRequest,
    GenerateRequest,
    SamplingFields,
    TokenizeRequest,
)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class TokenQueue(BaseStreamer):
    """Takes generate()'s new tokens on its thread and hands them, one id at a time, to the event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.queue: asyncio.Queue[int | None] = asyncio.Queue()
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate() first puts the prompt itself
            self.prompt_seen = True
            return
        for t in value.reshape(-1).tolist():
            self.loop.call_soon_threadsafe(self.queue.put_nowait, t)

    def end(self) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, None)


class Cancelled(StoppingCriteria):
    """Stops generate() at the next token once the client is gone."""

    def __init__(self, event: threading.Event) -> None:
        self.event = event

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


class NaiveModel:
    """A GPT-2 or Llama folder in transformers, its tokenizer, and the lock that serializes requests."""

    def __init__(self, folder: Path, name: str, dtype: str, device: str) -> None:
        self.name, self.device = name, torch.device(device)
        model: Any = AutoModelForCausalLM.from_pretrained(folder, dtype=DTYPES[dtype])
        self.model = model.to(self.device).eval()
        self.tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
        self.eos = eos_id(self.model.config)
        cfg = self.model.config
        self.context = int(getattr(cfg, "n_positions", None) or cfg.max_position_embeddings)  # GPT-2's, Llama's
        self.lock = asyncio.Lock()

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids or [self.eos]

    def _generate(self, ids: list[int], body: SamplingFields, streamer: TokenQueue, stop: threading.Event) -> None:
        kwargs: dict[str, Any] = dict(max_new_tokens=body.max_tokens, do_sample=body.temperature > 0,
                                      pad_token_id=self.eos, eos_token_id=self.eos)
        if body.temperature > 0:
            kwargs.update(temperature=body.temperature, top_p=body.top_p, top_k=body.top_k or None)
        if body.ignore_eos:
            kwargs["min_new_tokens"] = body.max_tokens  # EOS is masked until max_tokens
        if body.seed is not None:
            torch.manual_seed(body.seed)
        x = torch.tensor([ids], device=self.device)
        with torch.inference_mode():
            self.model.generate(x, attention_mask=torch.ones_like(x), streamer=streamer,
                                stopping_criteria=StoppingCriteriaList([Cancelled(stop)]), **kwargs)

    def check(self, ids: list[int], body: SamplingFields) -> None:
        limit = self.context
        if len(ids) + body.max_tokens > limit:
            raise HTTPException(400, f"prompt ({len(ids)}) + max_tokens ({body.max_tokens}) exceeds {limit} positions")
        if any(not 0 <= t < self.model.config.vocab_size for t in ids):
            raise HTTPException(400, "prompt has a token id outside the vocabulary")

    async def stream(self, ids: list[int], body: SamplingFields) -> AsyncIterator[int]:
        """Token ids as generate() makes them; waits for the lock first (that wait is part of TTFT)."""
        async with self.lock:
            loop = asyncio.get_running_loop()
            streamer, stop = TokenQueue(loop), threading.Event()
            work = loop.run_in_executor(None, self._generate, ids, body, streamer, stop)
            try:
                while (token := await streamer.queue.get()) is not None:
                    yield token
            finally:
                stop.set()
                await asyncio.shield(work)  # the lock is released only once generate() has returned


def _sse(data: Any, event: str | None = None) -> str:
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return (f"event: {event}\n" if event else "") + f"data: {payload}\n\n"


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def create_naive_app(folder: Path, name: str, dtype: str = "float32", device: str = "cpu") -> FastAPI:
    """The baseline app; the model loads in the lifespan, so /ready answers 200 only once it can generate."""
    state: dict[str, NaiveModel] = {}

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state["m"] = await asyncio.to_thread(NaiveModel, folder, name, dtype, device)
        yield

    app = FastAPI(title="naive transformers generate() server", lifespan=lifespan)

    @app.get("/ready")
    @app.get("/health")
    async def ready() -> dict[str, str]:
        return {"status": "ready"}

    @app.get("/v1/models/{model}")
    async def card(model: str) -> dict[str, Any]:
        m = state["m"]
        return {"id": name, "object": "model", "owned_by": "transformers",
                "details": {"vocab_size": m.model.config.vocab_size, "context_length": m.context, "dtype": dtype}}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [await card(name)]}

    @app.post("/v1/tokenize")
    async def tokenize(body: TokenizeRequest) -> dict[str, Any]:
        ids = state["m"].tok.encode(body.text, add_special_tokens=False).ids
        return {"model": name, "tokens": ids, "count": len(ids)}

    @app.post("/v1/detokenize")
    async def detokenize(body: DetokenizeRequest) -> dict[str, Any]:
        return {"model": name, "text": state["m"].tok.decode(body.tokens)}

    @app.post("/v1/generate", response_model=None)
    async def generate(body: GenerateRequest) -> JSONResponse | StreamingResponse:
        m = state["m"]
        ids = m.encode(body.prompt)
        m.check(ids, body)
        if body.stream:
            return StreamingResponse(_native_events(m, ids, body), media_type="text/event-stream")
        out = [t async for t in m.stream(ids, body)]
        return JSONResponse({"id": f"gen-{uuid.uuid4().hex}", "model": name, "text": m.tok.decode(out),
                             "token_ids": out, "finish_reason": _reason(out, body),
                             "usage": _usage(len(ids), len(out))})

    @app.post("/v1/completions", response_model=None)
    async def completions(body: CompletionRequest) -> JSONResponse | StreamingResponse:
        m = state["m"]
        if isinstance(body.prompt, str):
            ids = m.encode(body.prompt)
        elif body.prompt and all(isinstance(x, int) for x in body.prompt):
            ids = list(body.prompt)  # type: ignore[arg-type]
        else:
            raise HTTPException(400, "this baseline takes one prompt: a string or a list of token ids")
        m.check(ids, body)
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        if body.stream:
            usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(_openai_chunks(m, ids, body, rid, created, usage), media_type="text/event-stream")
        out = [t async for t in m.stream(ids, body)]
        choice = {"index": 0, "text": m.tok.decode(out), "logprobs": None, "finish_reason": _reason(out, body)}
        return JSONResponse({"id": rid, "object": "text_completion", "created": created, "model": name,
                             "choices": [choice], "usage": _usage(len(ids), len(out))})

    return app


def _reason(out: list[int], body: SamplingFields) -> str:
    return "length" if len(out) >= body.max_tokens else "stop"


async def _native_events(m: NaiveModel, ids: list[int], body: GenerateRequest) -> AsyncIterator[str]:
    out: list[int] = []
    async for t in m.stream(ids, body):
        out.append(t)
        yield _sse({"token_id": t, "text": m.tok.decode([t])}, "token")
    yield _sse({"finish_reason": _reason(out, body), "usage": _usage(len(ids), len(out))}, "done")


async def _openai_chunks(m: NaiveModel, ids: list[int], body: CompletionRequest, rid: str, created: int,
                         include_usage: bool) -> AsyncIterator[str]:
    head = {"id": rid, "object": "text_completion", "created": created, "model": m.name}
    n = 0
    async for t in m.stream(ids, body):
        n += 1
        finish = "length" if n >= body.max_tokens else None
        yield _sse({**head, "choices": [{"index": 0, "text": m.tok.decode([t]), "logprobs": None,
                                         "finish_reason": finish}]})
    if include_usage:
        yield _sse({**head, "choices": [], "usage": _usage(len(ids), n)})
    yield _sse("[DONE]")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.naive_server", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, required=True, help="a Hugging Face GPT-2 folder")
    p.add_argument("--name", help="the model name clients use (default: the folder's name)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, help="torch intra-op threads")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8001)
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    app = create_naive_app(a.model, a.name or a.model.name, a.dtype, a.device)
    uvicorn.run(app, host=a.host, port=a.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()

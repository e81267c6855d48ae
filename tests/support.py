"""Test support: random-weight checkpoints, settings for tests, and live uvicorn servers on 127.0.0.1."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path
from typing import Any

import torch
import uvicorn

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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_checkpoints(root: Path) -> Path:
    """tiny-gpt (char-level decoder-only) and tiny-mt (BPE encoder-decoder), random weights, seed 0."""
    torch.manual_seed(0)
    char = Tokenizer.train_char(CORPUS)
    gpt = build_model(preset("tiny-gpt", vocab_size=char.vocab_size, max_len=128))
    save_checkpoint(gpt, char, root / "tiny-gpt")
    bpe = Tokenizer.train_bpe([CORPUS] * 4, vocab_size=300)
    mt = build_model(preset("tiny-seq2seq", vocab_size=bpe.vocab_size, max_len=128, share_embeddings=True))
    save_checkpoint(mt, bpe, root / "tiny-mt")
    return root


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
    base: dict[str, Any] = dict(models_dir=models_dir, device="cpu", dtype="float32", kv_cache_blocks=256,
                                block_size=4, log_level="warning", drain_timeout=5.0)
    base.update(overrides)
    return Settings(**base)

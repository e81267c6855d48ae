"""`python -m service`: serve the models over HTTP. Flags override ATTNSERVE_* environment variables.

SIGTERM (or Ctrl-C) drains: /ready turns 503 and new requests get 503 while in-flight requests finish (up to the
drain timeout); the rest end with finish_reason "abort"; then the server exits 0. A second signal stops at once:
open connections are cut, the engines stop, and the process dies of that signal (exit status 143 for SIGTERM, 130
for Ctrl-C), with no traceback: every line on stderr stays JSON."""

from __future__ import annotations

import os

# Before torch loads OpenMP: an idle OpenMP thread spins for ~0.1 ms (GOMP_SPINCOUNT, libgomp's spins; ~100,000 a
# millisecond) and then sleeps. That bridges the few microseconds between one small op of a decode step and the
# next, and leaves the cores to the event loop (and, on a small machine, the clients) between steps. Measured on 2
# cores, SmolLM2 bfloat16 over HTTP: ITL at one stream 23.3 ms against 31.0 ms with OMP_WAIT_POLICY=PASSIVE alone
# (sleeping after every op) and 40 ms with ACTIVE (spinning for good); 376 against 292 tokens/s at 32 streams.
# Values set by the operator win.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("GOMP_SPINCOUNT", "10000")

import argparse
import logging
import shutil
import signal
import sys
import tempfile
from pathlib import Path
from typing import Any

import uvicorn

from model.checkpoint import CheckpointError
from service.app import create_app
from service.frontends import Frontends
from service.logs import log_config
from service.metrics import share_across_processes
from service.server import DrainingServer, check_port, die_of
from service.settings import Settings, SettingsError

log = logging.getLogger("attnserve.server")
ENGINE_DIED = 3  # the exit status when an engine core process died and --on-engine-death exit stops the server


def build_parser() -> argparse.ArgumentParser:
    """The command line; every flag has its help text and the default it falls back to."""
    d = Settings.model_fields
    p = argparse.ArgumentParser(
        prog="python -m service", description="Serve Transformers over HTTP. Every flag can also be set as an "
        "environment variable ATTNSERVE_<NAME> (see service/settings.py); flags win.",
        epilog="Example: python -m service --port 8080 --default-model shakespeare-gpt   (or: make serve PORT=8080)")
    p.add_argument("--host", help=f"address to listen on (default {d['host'].default})")
    p.add_argument("--port", type=int, metavar="PORT", help=f"port to listen on (default {d['port'].default})")
    p.add_argument("--models-dir", type=Path, metavar="DIR", help="serve every checkpoint folder under it (default: the shipped "
                   "models in model/checkpoints)")
    p.add_argument("--model", dest="models", action="append", type=Path, metavar="PATH",
                   help="also serve this checkpoint: our folder, a Hugging Face GPT-2 or Llama-family (Llama, "
                   "Mistral, Qwen2) folder, or a GGUF file, served under the file's stem (repeatable)")
    p.add_argument("--no-default-models", action="store_true",
                   help="do not serve the shipped models (only those given with --model/--models-dir)")
    p.add_argument("--default-model", metavar="NAME", help="the model a request without `model` gets (default: "
                   "the largest served decoder-only language model by parameter count, so shakespeare-gpt rather "
                   "than the translator multi30k-en-de with the shipped models; with no language model served, "
                   "the first model by name); an unknown name stops the start")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], help="auto: cuda when torch sees a GPU")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"],
                   help="weights and KV cache (auto: bfloat16 on CUDA; on a CPU bfloat16 only where it has native "
                   "bf16 instructions and the model's matvec and matmul measure faster in it, else float32; the "
                   "start-up log says why)")
    p.add_argument("--quantization", choices=["none", "int8"], help="int8: the linear layers' weights as int8 "
                   "with one scale per output channel, a quarter of float32's bytes to read per token; activations, "
                   "embeddings stay in --dtype (default none)")
    p.add_argument("--kv-cache-dtype", choices=["auto", "float32", "bfloat16"], help="the KV cache's storage (auto: "
                   "--dtype's, but bfloat16 under an int8 model's float32 activations: half the bytes for attention "
                   "to read and twice the tokens in --kv-cache-bytes, as llama.cpp keeps Q8_0's cache in F16)")
    p.add_argument("--threads", type=int, metavar="N", help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--kv-cache-blocks", type=int, metavar="N", help="KV cache blocks per model (default: "
                   f"{d['kv_cache_bytes'].default // 2**20} MiB worth)")
    p.add_argument("--kv-cache-bytes", type=int, metavar="BYTES", help="KV cache memory per model when "
                   f"--kv-cache-blocks is not given (default {d['kv_cache_bytes'].default // 2**20} MiB)")
    p.add_argument("--max-model-len", type=int, metavar="N", help="the longest request (prompt + output) served "
                   "(default: the model's context, capped to the KV cache's share for --max-num-seqs sequences, "
                   "never below 512 tokens; /v1/models says the length served)")
    p.add_argument("--max-num-seqs", type=int, metavar="N", help="sequences decoded together per model "
                   f"(default {d['max_num_seqs'].default})")
    p.add_argument("--max-num-batched-tokens", type=int, metavar="N", help="tokens one engine step may feed; "
                   "a longer prompt is prefilled in chunks of it while the running streams keep decoding "
                   f"(default {d['max_num_batched_tokens'].default})")
    p.add_argument("--enforce-eager", action="store_true", default=None,
                   help="run every step as the model's module calls: no CUDA graphs for decode steps, and on a CPU "
                        "no fused one-call step for a Llama-shaped bfloat16 model")
    p.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=None,
                   help="reuse the KV blocks of prompt prefixes already computed, shared between requests and `n` "
                   "choices (default on; --no-enable-prefix-caching computes every prompt in full)")
    p.add_argument("--num-scheduler-steps", type=int, metavar="N", help="decode steps an engine iteration may "
                   "run back to back for the same streams, their tokens handed over together (vLLM's multi-step "
                   f"scheduling; default {d['num_scheduler_steps'].default}, 1: one step per iteration)")
    p.add_argument("--max-burst-ms", type=float, metavar="MS", help="the longest such a burst runs before its "
                   f"tokens are sent (default {d['max_burst_ms'].default:g}); a new request or an abort ends it at once")
    p.add_argument("--engine-in-process", action="store_true", default=None,
                   help="run each model's engine on a thread of the server process instead of in its own engine "
                   "core process (the default: the step loop and the HTTP side then never wait for one GIL)")
    p.add_argument("--api-server-count", type=int, metavar="N", help="HTTP frontend processes (vLLM's flag): they "
                   "share the port and every model's engine core, and each tokenizes, detokenizes and streams its "
                   "own requests (default 1; more helps where cores are left after the engine's threads)")
    p.add_argument("--on-engine-death", choices=["restart", "exit"], help="when an engine core process dies, its "
                   "in-flight requests end with an error and /ready is false until: restart, a new core is loaded "
                   "(the default); exit, the server stops with exit status 3 for its supervisor to restart it")
    p.add_argument("--max-stream-backlog", type=int, metavar="N", help="outputs a streaming client may fall "
                   "behind before its request is aborted (a client that stopped reading; default "
                   f"{d['max_stream_backlog'].default})")
    p.add_argument("--api-key", dest="api_keys", action="append", metavar="KEY",
                   help="require `Authorization: Bearer KEY` (repeatable); no keys: the API is open")
    p.add_argument("--drain-timeout", type=float, metavar="SECONDS", help="seconds in-flight requests get after SIGTERM "
                   f"(default {d['drain_timeout'].default:g})")
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error", "critical"], help="default info")
    p.add_argument("--log-probes", action="store_true", default=None,
                   help="also write access-log lines for /health and /ready (off: probes every few seconds "
                   "would drown the log)")
    return p


def parse_args(argv: list[str] | None = None) -> dict[str, Any]:
    """The flags given, as Settings overrides (flags not given leave the environment's values)."""
    args = vars(build_parser().parse_args(argv))
    if args.pop("no_default_models"):
        args["models_dir"] = None
        args["_no_models_dir"] = True
    return {k: v for k, v in args.items() if v is not None}


def main(argv: list[str] | None = None) -> None:
    overrides = parse_args(argv)
    no_dir = overrides.pop("_no_models_dir", False)
    settings = Settings(**overrides)
    if no_dir:
        settings.models_dir = None
    shared = None
    try:
        if settings.api_server_count > 1:
            if settings.engine_in_process:
                raise SettingsError("--api-server-count above 1 needs the engine core processes: drop "
                                    "--engine-in-process")
            shared = tempfile.mkdtemp(prefix="attnserve-metrics-")
            share_across_processes(shared)  # before the first series is created
        app = create_app(settings)
        check_port(settings.host, settings.port)
        config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level,
                                log_config=log_config(settings.log_level, settings.log_json),
                                access_log=False, timeout_graceful_shutdown=5, lifespan="off")
        server = DrainingServer(config, settings)
        if shared is not None:
            app.state.frontends = Frontends(settings)

        def stop_on_engine_death() -> None:  # called from an engine client's thread: uvicorn polls should_exit
            server.engine_died = server.should_exit = True

        app.state.on_fatal = stop_on_engine_death
        server.run()
    except (CheckpointError, SettingsError, OSError) as e:  # a bad model folder, file or setting: say which
        log.error("cannot start: %s", e, extra={"error": str(e)})
        sys.exit(2)
    except KeyboardInterrupt:  # Ctrl-C while the models load, before the server's own handlers are installed
        log.warning("interrupted", extra={"signal": "SIGINT"})
        die_of(signal.SIGINT)
    finally:
        if shared is not None:
            shutil.rmtree(shared, ignore_errors=True)
    if server.stopped_by is not None:
        die_of(server.stopped_by)
    sys.exit(ENGINE_DIED if server.engine_died else 0)


if __name__ == "__main__":
    main()

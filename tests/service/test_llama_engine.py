"""A Llama-shaped model (rotary positions, RMSNorm, SwiGLU, 4 query heads over 2 K/V heads) through the real
engine: greedy tokens equal the reference decoder alone, batched, with and without prefix caching (decode rows
over shared blocks), under preemption and chunked prefill; the KV pool holds only the K/V heads; streamed
attention rows equal the teacher-forced pass per query head; /v1/attention equals transformers'; in bfloat16 the
fused CPU step equals the eager one."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from support import CORPUS, settings_for

from model import cpu_kernels, fused_step
from model.checkpoint import load_checkpoint, save_checkpoint
from model.config import preset
from model.generate import GenerationConfig, generate
from model.paged_cache import BlockPool
from model.tokenizer import Tokenizer
from model.transformer import build_model
from service.engine.request import AttentionSpec, SamplingParams, StepOutput
from service.registry import ServedModel, build_served_model

pytestmark = pytest.mark.usefixtures("one_thread")

HEAD = "ROMEO: What light through yonder window breaks? It is the east, "  # 64 characters: 16 blocks of 4
PROMPTS = [HEAD + t for t in ("and Juliet is the sun.", "and", "JULIET: O Romeo", "b")] + ["O", "Two dogs play"]
GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("llama")
    torch.manual_seed(0)
    char = Tokenizer.train_char(CORPUS)
    save_checkpoint(build_model(preset("tiny-llama", vocab_size=char.vocab_size, max_len=128)), char,
                    root / "tiny-llama")
    return root


@pytest.fixture
def build(llama_dir: Path) -> Iterator[Any]:
    made: list[ServedModel] = []

    def make(**overrides: Any) -> ServedModel:
        m = build_served_model(llama_dir / "tiny-llama", settings_for(llama_dir, **overrides))
        m.engine.start()
        made.append(m)
        return m

    yield make
    for m in made:
        m.engine.stop()


def reference(llama_dir: Path, prompts: list[str], n: int = 12) -> list[list[int]]:
    ref = load_checkpoint(llama_dir / "tiny-llama")
    return [generate(ref.model.eval(), ref.tokenizer.encode(p), GenerationConfig(max_new_tokens=n)) for p in prompts]


async def _one(served: ServedModel, rid: str, prompt: str, params: SamplingParams) -> list[StepOutput]:
    async with served.engine.open(served.make_request(rid, prompt, params)) as stream:
        return [o async for o in stream]


def run(served: ServedModel, prompts: list[str], together: bool,
        params: SamplingParams = GREEDY) -> list[list[StepOutput]]:
    async def main() -> list[list[StepOutput]]:
        if together:
            return list(await asyncio.gather(*(_one(served, f"r{i}", p, params) for i, p in enumerate(prompts))))
        return [await _one(served, f"r{i}", p, params) for i, p in enumerate(prompts)]

    return asyncio.run(main())


def tokens(outs: list[list[StepOutput]]) -> list[list[int]]:
    return [[o.token_id for o in out if o.token_id is not None] for out in outs]


@pytest.mark.parametrize("caching", [False, True], ids=["no-prefix-cache", "prefix-cache"])
@pytest.mark.parametrize("together", [False, True], ids=["alone", "batched"])
def test_greedy_tokens_equal_the_reference(build: Any, llama_dir: Path, caching: bool, together: bool) -> None:
    served = build(enable_prefix_caching=caching)
    assert tokens(run(served, PROMPTS, together)) == reference(llama_dir, PROMPTS)
    if caching:
        cache = served.engine.blocks.cache
        assert cache is not None and cache.hits >= 3 * (len(HEAD) // 4 - 1), "the shared head was not reused"


def test_preemption_and_chunked_prefill_keep_the_reference_tokens(build: Any, llama_dir: Path) -> None:
    served = build(kv_cache_blocks=32, max_num_batched_tokens=8, max_num_seqs=4, enable_prefix_caching=False)
    assert tokens(run(served, PROMPTS, together=True)) == reference(llama_dir, PROMPTS)
    assert served.engine.scheduler.num_preemptions > 0


@pytest.mark.parametrize("dtype,quantization", [("bfloat16", "none"), ("bfloat16", "int8"), ("float32", "none")])
def test_the_fused_cpu_step_equals_the_eager_step(build: Any, dtype: str, quantization: str) -> None:
    """On the CPU the one-call step (model/fused_step.py) gives the same greedy tokens and log-probs as
    `--enforce-eager`'s module calls, alone and batched, over shared prefix blocks, chunked and preempted (float32:
    log-probs to 1e-4, its sums in another order)."""
    if fused_step.kernel() is None:
        pytest.skip(f"no fused step here: {cpu_kernels.why_not('decoder_step') or 'no AVX-512 BF16 or AVX2'}")
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, logprobs=3)
    for knobs in ({}, {"kv_cache_blocks": 32, "max_num_batched_tokens": 8, "max_num_seqs": 4}):
        got: dict[bool, list[Any]] = {}
        for eager in (True, False):
            served = build(dtype=dtype, quantization=quantization, enforce_eager=eager, **knobs)
            assert (served.engine.runner.fused is None) == eager, served.engine.runner.why_not_fused
            got[eager] = [[(o.token_id, o.logprob, [(t.token_id, t.logprob) for t in o.top_logprobs]) for o in out]
                          for together in (False, True) for out in run(served, PROMPTS, together, params)]
        if dtype == "bfloat16":
            assert got[False] == got[True], knobs
        else:
            assert [[o[0] for o in out] for out in got[False]] == [[o[0] for o in out] for out in got[True]]
            for mine, theirs in zip(got[False], got[True], strict=True):
                for a, b in zip(mine, theirs, strict=True):
                    assert a[1] == pytest.approx(b[1], abs=1e-4) if a[1] is not None else b[1] is None


def test_the_pool_holds_only_the_shared_kv_heads(build: Any) -> None:
    served = build()
    cfg = served.checkpoint.config
    assert (cfg.h, cfg.kv_heads) == (4, 2)
    pool = served.engine.runner.pool
    assert pool.k.shape[-2:] == (2, cfg.d_k)
    per_token = BlockPool.bytes_per_block(cfg, 1, torch.float32)
    assert per_token == 2 * cfg.n_decoder_layers * 2 * cfg.d_k * 4  # half of multi-head attention's
    assert served.describe()["kv_bytes_per_token"] == per_token and served.describe()["kv_heads"] == 2


def test_streamed_attention_rows_equal_the_teacher_forced_pass(build: Any) -> None:
    """Each generated token's row (every layer, every query head) = that query's row in one teacher-forced
    forward over prompt + output through the explicit path."""
    served = build()
    req = served.make_request("a", PROMPTS[0], SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True))
    req.attention = AttentionSpec(aggregation="none")

    async def one() -> list[StepOutput]:
        async with served.engine.open(req) as stream:
            return [o async for o in stream]

    outs = asyncio.run(one())
    prompt = served.tokenizer.encode(PROMPTS[0])
    generated = [o.token_id for o in outs if o.token_id is not None]
    layers = range(served.checkpoint.config.n_decoder_layers)
    full = served.engine.runner.capture([], prompt + generated, {"decoder_self": layers})
    rows = [o.attention for o in outs if o.attention is not None]
    assert len(rows) == len(generated)
    for row in rows:
        q = row["query_position"]
        got = torch.tensor(row["decoder_self"], dtype=torch.float64)  # (layers, heads, T_k)
        want = torch.stack([full[("decoder_self", i)][:, q, : q + 1] for i in layers])
        assert got.shape == want.shape == (2, 4, q + 1)
        assert torch.allclose(got, want.double(), atol=1e-5), f"row at position {q} differs"


def test_attention_api_equals_transformers_output_attentions_for_a_gqa_llama(
        make_server: Callable[..., Any], tmp_path: Path) -> None:
    """/v1/attention on a Hugging Face Llama folder (4 query heads over 2 K/V heads) = transformers' eager
    attentions, per query head; /v1/models says which K/V head each query head reads."""
    transformers = pytest.importorskip("transformers")
    root = tmp_path / "models"
    tok = Tokenizer.train_bpe([CORPUS] * 4, vocab_size=300)
    cfg = transformers.LlamaConfig(vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=96,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=128, initializer_range=0.2)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(root / "llama-tiny")
    tok.save(root / "llama-tiny" / "tokenizer.json")
    server = make_server(models_dir=root)
    card = httpx.get(f"{server.url}/v1/models/llama-tiny", timeout=30).json()
    assert card["details"]["attention"]["kinds"]["decoder_self"]["kv_head_of_head"] == [0, 0, 1, 1]
    prompt = "ROMEO: But soft, what light through yonder window breaks?"
    r = httpx.post(f"{server.url}/v1/attention", json={"model": "llama-tiny", "prompt": prompt, "precision": 7},
                   timeout=60)
    assert r.status_code == 200, r.text
    body = r.json()
    ids = [t["id"] for t in body["decoder_tokens"]]
    hf = transformers.LlamaForCausalLM.from_pretrained(root / "llama-tiny", attn_implementation="eager").eval()
    with torch.no_grad():
        expected = hf(torch.tensor([ids]), output_attentions=True).attentions  # per layer (1, h, T, T)
    assert [m["layer"] for m in body["maps"]] == [0, 1]
    for m in body["maps"]:
        got = torch.tensor([[[float("nan") if v is None else v for v in row] for row in head]
                            for head in m["weights"]], dtype=torch.float64)
        ref = expected[m["layer"]][0].double()
        seen = ~got.isnan()
        assert got.shape == ref.shape == (4, len(ids), len(ids))
        assert (got[seen] - ref[seen]).abs().max() < 1e-5

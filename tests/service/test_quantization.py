"""`--quantization int8` through the real engine: the served model's linears are int8 and fused, the engine's
greedy tokens equal the same int8 model decoding alone, and the flag reaches the settings and /v1/models' info.
(Fusion alone is always on: the engine tests' greedy tokens equal the unfused reference decoder.)"""

from __future__ import annotations

import asyncio
import copy
from pathlib import Path

import pytest
import torch
from support import CORPUS, settings_for

from model import cpu_linear, fused_step
from model.checkpoint import load_checkpoint, save_checkpoint
from model.config import preset
from model.cpu_linear import PackedBlockInt8Linear, PackedLinear
from model.generate import GenerationConfig, generate
from model.prepack import PrepackedLinear
from model.quantize import Int8Linear
from model.tokenizer import Tokenizer
from model.transformer import build_model, num_parameters
from service.__main__ import parse_args
from service.engine.request import SamplingParams
from service.engine.weights import prepare
from service.registry import ServedModel, build_served_model
from service.settings import Settings

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = ["ROMEO: What light", "O", "JULIET: O Romeo, Romeo"]
GREEDY = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("int8")
    torch.manual_seed(0)
    char = Tokenizer.train_char(CORPUS)
    save_checkpoint(build_model(preset("tiny-llama", vocab_size=char.vocab_size, max_len=128)), char, root / "llama")
    return root


async def _greedy(served: ServedModel, prompts: list[str]) -> list[list[int]]:
    async def one(i: int, prompt: str) -> list[int]:
        async with served.engine.open(served.make_request(f"r{i}", prompt, GREEDY)) as stream:
            return [o.token_id async for o in stream if o.token_id is not None]

    return list(await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts))))


def test_int8_engine_tokens_equal_the_int8_model_alone(models_dir: Path) -> None:
    served = build_served_model(models_dir / "llama", settings_for(models_dir, quantization="int8"))
    served.engine.start()
    try:
        got = asyncio.run(_greedy(served, PROMPTS))
    finally:
        served.engine.stop()
    layer = served.model.decoder.layers[0]
    assert isinstance(layer.self_attn.w_qkv, Int8Linear) and isinstance(layer.ffn.w_13, Int8Linear)
    assert isinstance(layer.ffn.w_2, Int8Linear) and not isinstance(served.model.generator, Int8Linear)
    assert served.describe()["quantization"] == "int8"
    ref = load_checkpoint(models_dir / "llama")
    prepare(ref.model.eval(), "int8")
    want = [generate(ref.model, ref.tokenizer.encode(p), GenerationConfig(max_new_tokens=10)) for p in PROMPTS]
    assert got == want


def test_int8_under_float32_activations_keeps_its_kv_cache_in_bfloat16(models_dir: Path) -> None:
    """--kv-cache-dtype auto: an int8 model with float32 activations stores K/V in bfloat16 (half the bytes a token
    holds and attention reads, as llama.cpp keeps a Q8_0 model's cache in F16), so the same bytes hold twice the
    blocks; the fused step over that pool takes the eager step's tokens; float32 can still be asked for."""
    def build(**kw: object) -> ServedModel:
        return build_served_model(models_dir / "llama", settings_for(
            models_dir, quantization="int8", kv_cache_blocks=None, kv_cache_bytes=2**20, **kw))

    half, full, eager = build(), build(kv_cache_dtype="float32"), build(enforce_eager=True)
    assert half.engine.runner.pool.k.dtype == torch.bfloat16 and full.engine.runner.pool.k.dtype == torch.float32
    assert half.describe()["kv_cache_dtype"] == "bfloat16" and full.describe()["kv_cache_dtype"] == "float32"
    assert 2 * half.describe()["kv_bytes_per_token"] == full.describe()["kv_bytes_per_token"]
    assert half.engine.num_blocks == 2 * full.engine.num_blocks
    assert (half.engine.runner.fused is not None) == (fused_step.kernel() is not None)
    assert eager.engine.runner.fused is None and eager.engine.runner.pool.k.dtype == torch.bfloat16
    got = {}
    for name, served in (("fused", half), ("eager", eager), ("float32", full)):
        served.engine.start()
        try:
            got[name] = asyncio.run(_greedy(served, PROMPTS))
        finally:
            served.engine.stop()
    assert got["fused"] == got["eager"]
    assert sum(a == b for a, b in zip(got["fused"], got["float32"], strict=True)) >= 2  # bf16 K/V: rarely another token


def test_int8_serving_reads_the_head_in_q8_0_blocks_or_as_bfloat16() -> None:
    """With int8, a float32 LM head becomes int8 with a float16 scale per 32 features (Q8_0's form) where our matvec
    kernel multiplies that form, else a bfloat16 copy where the kernel is (a quarter or half the bytes a step reads
    there); the tied embedding stays float32, logits stay float32 and within int8's (bfloat16's) error of the
    float32 head, on the kernel's few rows and on a prefill's many."""
    kernel = cpu_linear.kernel()
    if kernel is None:
        pytest.skip("no matvec kernel on this CPU: the head stays float32")
    torch.manual_seed(0)
    model = build_model(preset("tiny-llama", vocab_size=300, max_len=128, tie_embeddings=True)).eval()
    assert model.generator.weight is model.tgt_embed.weight
    served = copy.deepcopy(model)
    counts = prepare(served, "int8")
    head = served.generator
    if kernel.has_q8_blocks():
        assert isinstance(head, PackedBlockInt8Linear) and head.qweight.dtype == torch.int8
        assert counts["quantized_linears"] == 7 * model.config.n_decoder_layers + 1  # 7 a layer, and the head
    else:
        assert isinstance(head, PackedLinear) and head.weight.dtype == torch.bfloat16
    assert served.tgt_embed.weight.dtype == torch.float32
    torch.testing.assert_close(served.tgt_embed.weight, model.tgt_embed.weight, rtol=0, atol=0)
    for rows in (1, 5, cpu_linear.MAX_ROWS + 1):
        hidden = torch.randn(rows, model.config.d_model)
        with torch.inference_mode():
            got, want = served.logits(hidden), model.logits(hidden)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2 * float(want.abs().max()))


def test_unquantized_serving_fuses_and_prepacks_float_weights(models_dir: Path) -> None:
    served = build_served_model(models_dir / "llama", settings_for(models_dir))
    ref = load_checkpoint(models_dir / "llama").model
    layer = served.model.decoder.layers[0]
    packed = PackedLinear if cpu_linear.kernel() is not None else PrepackedLinear  # ours where AVX-512 BF16 or AVX2, else oneDNN
    assert isinstance(layer.self_attn.w_qkv, packed) and isinstance(layer.ffn.w_13, packed)
    assert isinstance(layer.ffn.w_2, packed) and isinstance(served.model.generator, packed)
    assert type(layer.self_attn.w_q) is torch.nn.Linear  # a part the fused layer replaced: not packed again
    assert served.describe()["quantization"] == "none"
    assert num_parameters(served.model) == num_parameters(ref)


def test_prepare_refuses_an_unknown_quantization() -> None:
    model = build_model(preset("tiny-llama"))
    with pytest.raises(ValueError, match="int4"):
        prepare(copy.deepcopy(model), "int4")


def test_the_flags_reach_the_settings() -> None:
    assert parse_args(["--quantization", "int8", "--dtype", "auto"]) == {"quantization": "int8", "dtype": "auto"}
    assert Settings(**parse_args(["--quantization", "int8"])).quantization == "int8"
    assert Settings().quantization == "none" and Settings().kv_cache_dtype == "auto"
    assert Settings(**parse_args(["--kv-cache-dtype", "bfloat16"])).kv_cache_dtype == "bfloat16"
    with pytest.raises(SystemExit):
        parse_args(["--quantization", "int3"])

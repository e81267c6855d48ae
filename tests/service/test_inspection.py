"""service.inspection against independent computations: softmax(QK^T/sqrt(d_k)) from each layer's own projections,
rollout by hand, float16/base64 round trips, top-k and threshold sparsification, head statistics, limits."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from model.attention import MultiHeadAttention
from model.config import TransformerConfig, preset
from model.transformer import DecoderOnlyLM, Transformer, build_model
from service.engine.runner import ModelRunner
from service.inspection import encoding, maps
from service.inspection.maps import MapData
from service.inspection.selection import SelectionError, fit, model_kinds, resolve


def capture(model: Transformer | DecoderOnlyLM, enc: list[int], dec: list[int], layers: Any) -> dict[Any, Tensor]:
    """The engine's capture pass (what /v1/attention runs on the engine thread), on a runner of its own."""
    return ModelRunner(model, num_blocks=4, max_num_seqs=1, max_model_len=model.config.max_len,
                       max_num_batched_tokens=16).capture(enc, dec, layers)


def _tiny(arch: str) -> Transformer | DecoderOnlyLM:
    torch.manual_seed(0)
    name = "tiny-seq2seq" if arch == "encoder-decoder" else "tiny-gpt"
    # a larger init spread than usual so the weights are far from uniform (a real test of the softmax)
    model = build_model(preset(name, vocab_size=50)).eval()
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, MultiHeadAttention):
                mod.w_q.weight.mul_(4.0)
                mod.w_k.weight.mul_(4.0)
    return model


def _inputs_of(model: torch.nn.Module) -> dict[tuple[str, int], tuple[Tensor, Tensor | None]]:
    """Record what each attention module receives: its input x and, for cross-attention, the memory."""
    seen: dict[tuple[str, int], tuple[Tensor, Tensor | None]] = {}

    def hook(mod: MultiHeadAttention, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        memory = args[1] if len(args) > 1 else kwargs.get("memory")
        seen[(mod.kind, mod.layer_idx)] = (args[0].detach().clone(), None if memory is None else memory.detach().clone())

    for mod in model.modules():
        if isinstance(mod, MultiHeadAttention):
            mod.register_forward_pre_hook(hook, with_kwargs=True)
    return seen


def _reference(mod: MultiHeadAttention, x: Tensor, memory: Tensor | None) -> Tensor:
    """softmax(Q K^T / sqrt(d_k)) in float64 from the layer's w_q / w_k, with the causal mask for decoder self."""
    src = memory if mod.kind == "cross" else x
    assert src is not None
    q = F.linear(x.double(), mod.w_q.weight.double(), mod.w_q.bias.double())
    k = F.linear(src.double(), mod.w_k.weight.double(), mod.w_k.bias.double())
    b, t_q, d = q.shape
    t_k, h = k.shape[1], mod.h
    q = q.reshape(b, t_q, h, d // h).permute(0, 2, 1, 3)
    k = k.reshape(b, t_k, h, d // h).permute(0, 2, 1, 3)
    scores = torch.einsum("bhid,bhjd->bhij", q, k) / math.sqrt(d // h)
    if mod.kind == "decoder_self":
        scores = scores.masked_fill(torch.ones(t_q, t_k, dtype=torch.bool).triu(1), float("-inf"))
    return scores.softmax(-1)[0]  # (h, T_q, T_k)


@pytest.mark.parametrize("arch", ["decoder-only", "encoder-decoder"])
def test_weights_equal_softmax_of_the_layers_own_projections(arch: str) -> None:
    model = _tiny(arch)
    seen = _inputs_of(model)
    enc, dec = ([5, 9, 11, 3, 7, 20, 4], [1, 8, 13, 2, 30]) if arch == "encoder-decoder" else ([], [3, 17, 4, 9, 40, 12])
    sel = resolve(model.config, None, None, None, 0, None, "none", len(enc), len(dec))
    weights = capture(model, enc, dec, sel.captured_layers)
    expected_kinds = model_kinds(model.config)
    assert {k for k, _ in weights} == set(expected_kinds)
    modules = {(m.kind, m.layer_idx): m for m in model.modules() if isinstance(m, MultiHeadAttention)}
    for key, got in weights.items():
        ref = _reference(modules[key], *seen[key])
        assert got.shape == ref.shape
        assert (got.double() - ref).abs().max().item() < 1e-5, key
        assert ref.max() > 0.5, "peaky reference weights make the comparison meaningful"


def test_rows_sum_to_one_and_causal_cells_are_masked() -> None:
    model = _tiny("encoder-decoder")
    enc, dec = [5, 9, 11, 3, 7], [1, 8, 13, 2]
    sel = resolve(model.config, None, None, [0, 2], 1, None, "none", len(enc), len(dec))
    found = maps.build_maps(capture(model, enc, dec, sel.captured_layers), sel)
    assert {(m.kind, m.layer) for m in found} == {(k, i) for k in model_kinds(model.config) for i in (0, 1)}
    for m in found:
        assert m.weights.shape[:2] == (2, sel.q_end[m.kind] - 1)
        assert torch.allclose(m.weights.sum(-1), torch.ones(m.weights.shape[:2]), atol=1e-5)
        rows = encoding.json_rows(m, 6)
        for head in rows:
            for i, row in enumerate(head):
                position = m.q_start + i
                for j, v in enumerate(row):
                    if m.kind == "decoder_self" and j > position:
                        assert v is None, (m.kind, i, j)
                    else:
                        assert isinstance(v, float)
        assert (encoding.mask_text(m) is not None) == (m.kind == "decoder_self")


def test_rollout_equals_hand_computed_cases() -> None:
    # causal 2x2: A_hat_1 = [[1,0],[.25,.75]], A_hat_2 = [[1,0],[.1,.9]], R_2 = A_hat_2 @ A_hat_1
    a1, a2 = torch.tensor([[1.0, 0.0], [0.5, 0.5]]), torch.tensor([[1.0, 0.0], [0.2, 0.8]])
    r1, r2 = maps.rollout([a1, a2])
    assert torch.allclose(r1, torch.tensor([[1.0, 0.0], [0.25, 0.75]]))
    assert torch.allclose(r2, torch.tensor([[1.0, 0.0], [0.325, 0.675]]))
    # full 2x2: A_hat_1 = [[.75,.25],[.25,.75]], A_hat_2 = [[.5,.5],[.5,.5]] -> R_2 = all 0.5
    b1, b2 = torch.full((2, 2), 0.5), torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    s1, s2 = maps.rollout([b1, b2])
    assert torch.allclose(s1, torch.tensor([[0.75, 0.25], [0.25, 0.75]]))
    assert torch.allclose(s2, torch.full((2, 2), 0.5))


def test_rollout_maps_start_at_layer_zero_with_the_mean_over_heads() -> None:
    model = _tiny("decoder-only")
    dec = [3, 17, 4, 9, 40]
    sel = resolve(model.config, None, [1], None, 0, None, "rollout", 0, len(dec))
    weights = capture(model, [], dec, sel.captured_layers)
    (m,) = maps.build_maps(weights, sel)
    assert (m.kind, m.layer, m.aggregation, m.weights.shape) == ("decoder_self", 1, "rollout", (1, 5, 5))
    eye = torch.eye(5)
    hat = [(weights[("decoder_self", i)].mean(0) + eye) / (weights[("decoder_self", i)].mean(0) + eye).sum(-1, True)
           for i in (0, 1)]
    assert torch.allclose(m.weights[0], hat[1] @ hat[0], atol=1e-6)
    assert torch.allclose(m.weights[0].triu(1), torch.zeros(5, 5)), "rollout of causal layers stays causal"


def test_float16_base64_round_trip() -> None:
    rng = np.random.default_rng(0)
    a = rng.random((3, 5, 7)).astype(np.float32)
    enc = encoding.encode_array(a, "float16")
    assert (enc["dtype"], enc["shape"], enc["byteorder"]) == ("float16", [3, 5, 7], "little")
    import base64

    raw = base64.b64decode(enc["data"])
    assert len(raw) == 2 * a.size
    assert np.array_equal(np.frombuffer(raw, dtype="<f2").reshape(3, 5, 7), a.astype(np.float16))
    back = encoding.decode_array(enc)
    assert back.dtype == np.float16 and np.abs(back.astype(np.float32) - a).max() < 1e-3
    ints = np.array([0, 1, 65535], dtype=np.int64)
    assert encoding.decode_array(encoding.encode_array(ints, "uint16")).tolist() == [0, 1, 65535]


def _causal_map(seed: int = 0) -> MapData:
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(2, 6, 6, generator=g) * 3
    scores = scores.masked_fill(torch.ones(6, 6, dtype=torch.bool).triu(1), float("-inf"))
    return MapData("decoder_self", 0, (0, 1), "none", 0, scores.softmax(-1))


def test_top_k_keeps_the_largest_visible_entries_and_reports_kept_mass() -> None:
    m = _causal_map()
    sp = maps.sparsify(m, 3, None)
    w = m.weights
    for r in range(2 * 6):
        a, i = divmod(r, 6)
        idx = sp.indices[sp.row_ptr[r]: sp.row_ptr[r + 1]]
        vals = sp.values[sp.row_ptr[r]: sp.row_ptr[r + 1]]
        visible = i + 1
        expected = sorted(torch.argsort(w[a, i, :visible], descending=True)[:3].tolist())
        assert idx.tolist() == expected, (a, i)
        assert np.allclose(vals, w[a, i, expected].numpy())
        assert math.isclose(float(sp.kept_mass[a, i]), float(w[a, i, expected].sum()), rel_tol=1e-6)
        if visible <= 3:
            assert math.isclose(float(sp.kept_mass[a, i]), 1.0, rel_tol=1e-5)
    fields = encoding.sparse_fields(sp, m, "json", 6)
    assert fields["kept_mass_min"] == pytest.approx(float(sp.kept_mass.min()), abs=1e-6)
    assert len(fields["indices"]) == 2 and len(fields["indices"][0]) == 6


def test_threshold_keeps_weights_at_or_above_it() -> None:
    m = _causal_map(1)
    sp = maps.sparsify(m, None, 0.2)
    keep = (m.weights >= 0.2) & m.visible
    assert sp.nnz == int(keep.sum())
    assert np.allclose(sp.kept_mass, (m.weights * keep).sum(-1).numpy())
    b64 = encoding.sparse_fields(sp, m, "base64", 4)
    assert encoding.decode_array(b64["indices_data"]).tolist() == sp.indices.tolist()
    assert encoding.decode_array(b64["row_ptr"]).tolist() == sp.row_ptr.tolist()


def test_head_stats_entropy_and_first_token_share() -> None:
    w = torch.zeros(2, 3, 3)
    w[0] = torch.tensor([[1.0, 0, 0], [0.5, 0.5, 0], [1 / 3, 1 / 3, 1 / 3]])  # uniform over the visible keys
    w[1, :, 0] = 1.0  # everything on the first token
    stats = maps.head_stats(MapData("decoder_self", 0, (4, 7), "none", 0, w))
    assert [s["head"] for s in stats] == [4, 7]
    assert stats[0]["entropy"] == pytest.approx((0 + math.log(2) + math.log(3)) / 3, abs=1e-6)
    assert stats[0]["max_entropy"] == pytest.approx(stats[0]["entropy"], abs=1e-6)
    assert stats[0]["first_token"] == pytest.approx((1 + 0.5 + 1 / 3) / 3, abs=1e-6)
    assert stats[1]["entropy"] == pytest.approx(0.0, abs=1e-9) and stats[1]["first_token"] == pytest.approx(1.0)


def test_selection_errors_name_the_field() -> None:
    gpt, mt = preset("tiny-gpt"), preset("tiny-seq2seq")
    cases: list[tuple[TransformerConfig, dict[str, Any], str, str]] = [
        (gpt, dict(kinds=["cross"]), "kinds", "does not exist"),
        (gpt, dict(layers=[2]), "layers", "out of range for decoder_self: the model has 2 layers"),
        (mt, dict(heads=[4]), "heads", "4 heads"),
        (mt, dict(kinds=["cross"], aggregation="rollout"), "kinds", "rollout"),
        (mt, dict(q_start=9), "queries", "select no position"),
    ]
    for cfg, kw, param, words in cases:
        args: dict[str, Any] = dict(kinds=None, layers=None, heads=None, q_start=0, q_end=None, aggregation="none",
                                    n_encoder=5, n_decoder=5)
        args.update(kw)
        with pytest.raises(SelectionError) as e:
            resolve(cfg, **args)
        assert e.value.param == param and words in str(e.value), str(e.value)


def test_fit_finds_a_smaller_selection_within_the_limit() -> None:
    cfg = preset("tiny-seq2seq", n_encoder_layers=3, n_decoder_layers=3)
    sel = resolve(cfg, None, None, None, 0, None, "none", 30, 20)
    assert sel.values == 3 * 4 * (30 * 30 + 20 * 20 + 20 * 30)
    for limit in (20_000, 5_000, 900, 100, 30):
        fitted = fit(sel, limit)
        assert fitted is not None and 0 < fitted.values <= limit
        again = resolve(cfg, fitted.as_request()["kinds"], fitted.as_request()["layers"],
                                fitted.as_request()["heads"], 0, fitted.as_request()["queries"].get("end"), "none",
                                30, 20)
        assert again.values <= limit, "the suggested request fields select what fits"
    assert fit(sel, 29) is None, "one row of 30 keys is the smallest map of this input"
    with_top_k = resolve(cfg, None, None, None, 0, None, "none", 30, 20, top_k=2)
    assert with_top_k.values == 3 * 4 * 2 * (30 + 20 + 20), "top_k bounds the values per row"

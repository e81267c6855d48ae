"""POST /v1/attention's work: the teacher-forced attention of one input (generated first on request), selected,
aggregated, sparsified and encoded, or drawn as a PNG. One capture pass at a time, bounded by the inspection
limits, so generation for other users keeps going."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from dataclasses import dataclass
from typing import Any

from service.engine.request import SamplingParams
from service.errors import APIError, output_error
from service.inspection import encoding, maps, render, tokens
from service.inspection.selection import AXES, Selection, estimated_bytes, fit, resolve
from service.registry import ServedModel
from service.schemas.inspection import AttentionDryRun, AttentionRequest, AttentionResponse, InspectionLimits
from service.serving.common import sampling_params
from service.serving.constraints import compiled, constraint_of
from service.settings import Settings

Span = tuple[int, int] | None


@dataclass
class Inputs:
    """The token sequences to inspect, with their texts and character spans."""

    encoder_ids: list[int]
    encoder_spans: list[Span]
    decoder_ids: list[int]
    decoder_spans: list[Span]
    encoder_text: str | None
    decoder_text: str
    generated: int = 0


def _inputs(served: ServedModel, body: AttentionRequest) -> Inputs:
    tok = served.tokenizer
    bos = tok.bos_id if tok.bos_id is not None else 0
    if not served.is_encoder_decoder:
        if body.source is not None or body.target is not None:
            raise APIError(400, "a decoder-only model reads `prompt`; source and target are for translators",
                           param="source" if body.source is not None else "target")
        if body.prompt is None:
            raise APIError(400, "prompt is required", param="prompt")
        ids, spans = tok.encode_with_offsets(body.prompt)
        if not ids:  # as the engine does: an empty prompt starts from BOS
            ids, spans = [bos if tok.bos_id is not None else (tok.eos_id or 0)], []
        return Inputs([], [], ids, list(spans) + [None] * (len(ids) - len(spans)), None, body.prompt)
    if body.source is not None and body.prompt is not None:
        raise APIError(400, "give the source as `source` or `prompt`, not both", param="prompt")
    source = body.source if body.source is not None else body.prompt
    if not source:
        raise APIError(400, "a translator needs a non-empty `source`", param="source")
    src_ids, src_spans = tok.encode_with_offsets(source)
    tgt_ids, tgt_spans = tok.encode_with_offsets(body.target or "")
    return Inputs(src_ids, list(src_spans), [bos, *tgt_ids], [None, *tgt_spans], source, body.target or "")


def _check_tokens(served: ServedModel, inp: Inputs, budget: int, settings: Settings) -> None:
    """413 past inspect_max_tokens (naming a request that fits); 400 past the model's context."""
    limit, fixed = settings.inspect_max_tokens, len(inp.encoder_ids) + len(inp.decoder_ids)
    total = fixed + budget
    if total > limit:
        parts = ([f"source {len(inp.encoder_ids)}"] if served.is_encoder_decoder else []) + [
            f"{'target' if served.is_encoder_decoder else 'prompt'} {len(inp.decoder_ids)}"] + (
            [f"max_tokens {budget}"] if budget else [])
        fix = (f"lower max_tokens to {limit - fixed}" if budget and fixed < limit else
               f"shorten the input by {total - limit} tokens" + (" and lower max_tokens" if budget else ""))
        raise APIError(413, f"this inspection covers {total} tokens ({' + '.join(parts)}); the limit "
                       f"(inspect_max_tokens) is {limit}: {fix}", param="prompt", code="inspection_too_large")
    max_len = served.checkpoint.config.max_len
    longest = max(len(inp.encoder_ids), len(inp.decoder_ids) + budget)
    if longest > max_len:
        raise APIError(400, f"this model's maximum context length is {max_len} tokens; the inspection needs "
                       f"{longest}", param="prompt", code="context_length_exceeded")


def _selection(served: ServedModel, body: AttentionRequest, n_enc: int, n_dec: int) -> Selection:
    """The request's selection checked against the model (a SelectionError answers 400 naming the field)."""
    q = body.queries
    return resolve(served.checkpoint.config, body.kinds, body.layers, body.heads, q.start if q else 0,
                   q.end if q else None, body.aggregation, n_enc, n_dec, body.sparsify.top_k if body.sparsify else None)


def _values_message(sel: Selection, limit: int) -> str | None:
    if sel.values <= limit:
        return None
    msg = f"the selection has {sel.values:,} attention values; the limit (inspect_max_values) is {limit:,}"
    smaller = fit(sel, limit)
    if smaller is None:
        return msg + ": no selection of this input fits; shorten it"
    return (msg + f": a smaller selection that fits is {json.dumps(smaller.as_request())} ({smaller.values:,} "
            "values); aggregation 'mean' or top_k also shrink it")


def _limits(settings: Settings) -> InspectionLimits:
    return InspectionLimits(max_tokens=settings.inspect_max_tokens, max_values=settings.inspect_max_values)


def _params(settings: Settings, served: ServedModel, body: AttentionRequest, inp: Inputs) -> SamplingParams:
    """How `generate` samples: the request's `sampling`, max_tokens sized to a translator's source by default."""
    ids = inp.encoder_ids if served.is_encoder_decoder else inp.decoder_ids
    return sampling_params(body.sampling, settings, None, default_max_tokens=served.default_max_tokens(ids),
                           prompt=inp.encoder_text if served.is_encoder_decoder else inp.decoder_text)


async def _generate(rid: str, served: ServedModel, params: SamplingParams, inp: Inputs,
                    body: AttentionRequest) -> Inputs:
    """Generate the continuation (translator: the target) through the engine, held to the body's constraint if
    it gives one; return the extended inputs."""
    ids = inp.encoder_ids if served.is_encoder_decoder else inp.decoder_ids
    constraint, where = constraint_of(body)
    grammar = await compiled(served, constraint, where)
    req = served.make_request(rid, None, dataclasses.replace(params, constraint=constraint),
                              prompt_ids=ids, grammar=grammar)
    stream = served.open(req)
    stops = {served.tokenizer.eos_id, *params.stop_token_ids}

    async def collect() -> list[int]:
        out_ids: list[int] = []
        async with stream:
            async for out in stream:
                if out.token_id is not None:
                    out_ids.append(out.token_id)
                if out.finished and out.finish_reason == "error":
                    raise output_error(out)
                if out.finished and out.finish_reason == "stop" and out_ids and out_ids[-1] in stops:
                    out_ids.pop()  # the stop token that ended it (it has no text) is not inspected
        return out_ids

    out_ids = await collect()
    tok = served.tokenizer
    base = len(inp.decoder_text)
    return Inputs(inp.encoder_ids, inp.encoder_spans, inp.decoder_ids + out_ids,
                  inp.decoder_spans + tokens.generated_spans(tok, out_ids, base), inp.encoder_text,
                  inp.decoder_text + tok.decode(out_ids), len(out_ids))


def _map_out(m: maps.MapData, body: AttentionRequest) -> tuple[dict[str, Any], int]:
    """One map's fields and how many values it carries."""
    h, t_q, t_k = m.weights.shape
    q_axis, k_axis = AXES[m.kind]
    out: dict[str, Any] = {"kind": m.kind, "layer": m.layer, "heads": list(m.heads), "aggregation": m.aggregation,
                           "queries": q_axis, "keys": k_axis, "query_start": m.q_start, "query_end": m.q_start + t_q,
                           "shape": [h, t_q, t_k], "causal": m.causal, "mask": encoding.mask_text(m)}
    if body.stats:
        out["stats"] = maps.head_stats(m)
    if not body.return_weights:
        return out, 0
    if body.sparsify is not None:
        top_k, threshold = body.sparsify.top_k, body.sparsify.threshold
        sp = maps.sparsify(m, top_k, threshold)
        out["sparse"] = {"method": "top_k" if top_k is not None else "threshold",
                         "parameter": top_k if top_k is not None else threshold,
                         **encoding.sparse_fields(sp, m, body.encoding, body.precision)}
        return out, sp.nnz
    if body.encoding == "base64":
        out["data"] = encoding.encode_array(m.weights.numpy(), "float16")
    else:
        out["weights"] = encoding.json_rows(m, body.precision)
    return out, h * t_q * t_k


class Attention:
    """Attention inspection for one model: the inputs checked against the limits, generation first when asked
    (through the engine, held to a constraint if given), one teacher-forced capture pass at a time (`gate`), the
    maps selected, aggregated, summarized, sparsified and encoded."""

    def __init__(self, served: ServedModel, settings: Settings, gate: asyncio.Semaphore) -> None:
        self.served, self.settings, self.gate = served, settings, gate

    async def create(self, body: AttentionRequest, rid: str) -> AttentionResponse | AttentionDryRun | bytes:
        """The maps (JSON), the size without computing (dry_run), or a PNG heatmap's bytes (format png)."""
        served, settings = self.served, self.settings
        inp = _inputs(served, body)
        generate = body.generate and not (served.is_encoder_decoder and body.target)
        params = _params(settings, served, body, inp) if generate else None
        budget = params.max_tokens if params is not None else 0
        _check_tokens(served, inp, budget, settings)
        sel = _selection(served, body, len(inp.encoder_ids), len(inp.decoder_ids) + budget)
        message = _values_message(sel, settings.inspect_max_values)
        if body.dry_run:
            sparse = body.sparsify is not None
            return AttentionDryRun(model=served.name, encoder_tokens=len(inp.encoder_ids),
                                   decoder_tokens=len(inp.decoder_ids) + budget, maps=sel.num_maps, values=sel.values,
                                   estimated_bytes=estimated_bytes(sel, body.encoding, body.precision, sparse),
                                   within_limits=message is None, message=message, limits=_limits(settings))
        if message is not None:
            raise APIError(413, message, param="layers", code="inspection_too_large")
        if params is not None:
            inp = await _generate(rid, served, params, inp, body)
            sel = _selection(served, body, len(inp.encoder_ids), len(inp.decoder_ids))
        async with self.gate:
            t0 = time.monotonic()
            weights = await served.engine.capture(inp.encoder_ids, inp.decoder_ids, sel.captured_layers)
            elapsed = time.monotonic() - t0
        found = maps.build_maps(weights, sel)
        tok = served.tokenizer
        if body.format == "png":
            labels = {"encoder": [tok.token_text(i) for i in inp.encoder_ids],
                      "decoder": [tok.token_text(i) for i in inp.decoder_ids]}
            return await asyncio.to_thread(render.render_png, found, labels)
        outs = [_map_out(m, body) for m in found]
        n_dec_given = len(inp.decoder_ids) - inp.generated
        return AttentionResponse.model_validate({
            "model": served.name, "architecture": served.checkpoint.config.arch,
            "encoder_text": inp.encoder_text, "decoder_text": inp.decoder_text,
            "encoder_tokens": tokens.token_views(tok, inp.encoder_ids, inp.encoder_spans, len(inp.encoder_ids))
            if served.is_encoder_decoder else None,
            "decoder_tokens": tokens.token_views(tok, inp.decoder_ids, inp.decoder_spans, n_dec_given),
            "generated_tokens": inp.generated, "values": sum(n for _, n in outs), "maps": [o for o, _ in outs],
            "limits": _limits(settings), "compute_time": round(elapsed, 6)})

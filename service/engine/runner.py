"""One ragged forward per engine step, from persistent device buffers, sampled on the device.

The only engine files that import the model package are this one and its device-side helpers (inputs,
sampler, cuda_graphs). A step packs its plan into the persistent input buffers (one host-to-device copy), runs
the translator's encoder for requests that start, runs one forward over every scheduled token (decode rows and
prefill chunks together; model/paged_cache.py attends each row over its block table in place; on a CPU, a
Llama-shaped bfloat16 model's stack runs as one C++ call, model/fused_step.py), samples the rows that end their
known tokens, and brings the packed result back in one device-to-host copy."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor

from model import cpu_kernels, fused_step, hugepages
from model.attention import AttentionCapture, MultiHeadAttention
from model.paged_cache import BlockPool, PagedKVCache
from model.transformer import DecoderOnlyLM, Transformer, num_parameters
from service.engine.cuda_graphs import DecodeGraphs
from service.engine.inputs import Prepared, StepInputs, Transfers
from service.engine.request import ModelOutput, PromptLogprob, TokenLogprob
from service.engine.sampler import ERROR_NAN, Sampler
from service.engine.scheduler import ScheduledRequest
from service.engine.threads import ONE_CORE_FLOPS, ONE_CORE_FLOPS_FLOAT32, Threads
from service.engine.weights import prepare as prepare_weights

log = logging.getLogger("attnserve.runner")

ERROR_STUCK = "the output's constraint allows no token of this model's vocabulary here"
# (activations, KV cache) the CPU kernel attends over
PAGED_DTYPES = ((torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.float32, torch.bfloat16))


class ModelRunner:
    """Owns the model on its device, the KV pool, the input buffers and the sampler."""

    def __init__(
        self,
        model: Transformer | DecoderOnlyLM,
        num_blocks: int,
        max_num_seqs: int, max_model_len: int,
        block_size: int = 16, device: str = "cpu", dtype: torch.dtype = torch.float32,
        max_num_batched_tokens: int = 2048,
        enforce_eager: bool = False,
        quantization: str | None = None,
        kv_dtype: torch.dtype | None = None,
    ) -> None:
        self.device, self.dtype = torch.device(device), dtype
        self.model = model.to(device=self.device, dtype=dtype).eval()
        prepare_weights(self.model, quantization)  # int8 if asked, then fused projections (engine/weights.py)
        # the weights a step streams, on 2 MB pages (model/hugepages.py)
        self.huge_page_bytes = hugepages.to_huge_pages(self.model) if self.device.type == "cpu" else 0
        self.config = model.config
        self.block_size = block_size
        kv_dtype = kv_dtype or dtype
        on_cpu = self.device.type == "cpu" and (dtype, kv_dtype) in PAGED_DTYPES
        kernel = cpu_kernels.load("paged_attention") if on_cpu else None
        self.pool = BlockPool(self.config, num_blocks, block_size, max_num_seqs, self.device, kv_dtype, kernel)
        max_source = self.config.max_len if self.config.is_encoder_decoder else 0
        max_blocks = -(-max_model_len // block_size)
        self.inputs = StepInputs(self.pool, max_num_batched_tokens, max_num_seqs, max_blocks, max_source,
                                 self.device, vocab_size=self.config.vocab_size)
        self.sampler = Sampler(self.device)
        self.num_threads = torch.get_num_threads()  # the process's intra-op setting when the model was loaded
        params, int8 = num_parameters(self.model), quantization == "int8"
        flops_per_s = ONE_CORE_FLOPS_FLOAT32 if dtype == torch.float32 and not int8 else ONE_CORE_FLOPS
        self.threads = Threads(self.num_threads, params * (1 if int8 else dtype.itemsize), 2 * params, flops_per_s)
        self._threads = self.num_threads
        use_graphs = self.device.type == "cuda" and not enforce_eager and not self.config.is_encoder_decoder
        self.graphs: DecodeGraphs | None = (DecodeGraphs(self.forward_decode, self.inputs, max_num_seqs,
                                                         max_blocks * block_size) if use_graphs else None)
        self.fused: fused_step.FusedStep | None = None  # the CPU's one-call step (not with --enforce-eager)
        self.why_not_fused = ("--enforce-eager" if enforce_eager else "not on a CPU" if self.device.type != "cpu"
                              else f"a {kv_dtype} KV cache under {dtype} activations" if not on_cpu else "")
        if not self.why_not_fused:
            self.why_not_fused = fused_step.why_not(self.model)
            self.fused = fused_step.FusedStep(self.model) if not self.why_not_fused else None
            log.info("decode step", extra={"fused": self.fused is not None, "why_not": self.why_not_fused,
                                           "weights_on_huge_pages": self.huge_page_bytes})

    @property
    def transfers(self) -> Transfers:
        return self.inputs.transfers

    def bind_thread(self) -> None:
        """Apply `num_threads` to the calling thread (the engine loop): OpenMP's thread count is per OS thread,
        so a new thread would use one per core whatever `torch.set_num_threads` said elsewhere."""
        torch.set_num_threads(self.num_threads)
        self._threads = self.num_threads

    def _threads_for(self, num_rows: int, num_seqs: int, decode_only: bool) -> None:
        """A CPU step's thread count: by its size, and for a decode step the rule would split, as measured
        (engine/threads.py)."""
        if self.device.type != "cpu":
            return
        want = self.threads.choose(num_rows, num_seqs, decode_only)
        if want != self._threads:
            torch.set_num_threads(want)
            self._threads = want

    def release(self, request_id: str) -> None:
        self.sampler.release(request_id)

    # --- the step -----------------------------------------------------------------------------------------------

    def execute(self, plan: list[ScheduledRequest], copies: list[tuple[int, int, int]] | None = None
                ) -> ModelOutput:
        """Run the plan's tokens through the model; sample each request whose chunk reaches its last token.
        `copies` first: (from block, to block, n) K/V of requests that start inside a block computed elsewhere."""
        started = time.perf_counter()
        out = self._execute(plan, copies)
        self.threads.record(time.perf_counter() - started)  # for the thread count's choice
        return out

    @torch.inference_mode()
    def _execute(self, plan: list[ScheduledRequest], copies: list[tuple[int, int, int]] | None) -> ModelOutput:
        for source, dest, n in copies or ():
            self.pool.copy(source, dest, n)
        capture_ids = {s.request.request_id for s in plan if s.request.attention is not None}
        bucket = self.graphs.bucket(plan) if self.graphs is not None and not capture_ids else None
        prep = self.inputs.prepare(plan, capture_ids, *(bucket or (None, None)))
        self._threads_for(prep.num_rows, len(plan), prep.num_rows == len(plan))
        if prep.encode:
            self._encode(prep)
        cache, logits = None, None
        rows = self.inputs.d["sample_rows"][: len(prep.sampled)]
        if bucket is not None and self.graphs is not None:
            hidden = self.graphs.run(bucket)  # (S_bucket, d_model)
        else:
            cache = PagedKVCache(self.pool, prep.layout)
            d = self.inputs.d
            tokens, positions = d["tokens"][: prep.num_rows][None], d["positions"][: prep.num_rows][None]
            capture = self._capture(plan)
            fused = self.fused if capture is None and self.fused is not None and self.fused.accepts(
                prep.layout, prep.num_rows) else None
            if fused is not None and fused.has_head and prep.sampled and not prep.scored:
                logits = fused.logits(tokens[0], positions[0], cache, rows)  # (R, vocab): one call, head included
            elif fused is not None:
                hidden = fused(tokens[0], positions[0], cache)  # (N, d)
            else:
                hidden = self.model.decode(tokens, positions, cache=cache, capture=capture)[0]  # (N, d)
        parts: list[Tensor] = []
        if prep.sampled:
            if logits is None:
                logits = self.model.logits(hidden.index_select(0, rows)).float()  # (R, vocab)
            reqs = [s.request for s in prep.sampled]
            parts.append(self.sampler(logits, self.inputs.d_params, reqs, self._mask(prep)))
        k_prompt = max((s.request.params.prompt_logprobs or 0 for s in plan), default=0)
        if prep.scored:
            parts.append(self._score(hidden, len(prep.scored), k_prompt))
        if not parts:
            return ModelOutput([-1] * len(plan))
        width = parts[0].shape[1] if prep.sampled else 0
        flat = self.transfers.d2h(torch.cat([p.flatten() for p in parts])).tolist()  # the step's one copy back
        host = [flat[i * width : (i + 1) * width] for i in range(len(prep.sampled))]
        scores = flat[len(prep.sampled) * width :]
        out = self._output(plan, prep, host, cache, prep.stuck)
        if prep.scored:
            self._prompt_logprobs(out, prep, scores, k_prompt)
        return out

    @torch.inference_mode()
    def burst_step(self, plan: list[ScheduledRequest], last: Prepared | None) -> tuple[ModelOutput | None, Prepared]:
        """A decode burst's inner step (engine/burst.py): rows that want their next token only, through the
        one-call step and the sampler, from `last` step's inputs moved on where it is given. The output is None
        where the one-call step cannot take it here (`execute` runs the step instead, and reports a NaN row)."""
        fused = self.fused
        prep = (last is not None and self.inputs.advance(last, plan)) or self.inputs.prepare(plan, set())
        if fused is None or not fused.has_head or not fused.accepts(prep.layout, prep.num_rows):
            return None, prep
        d, n = self.inputs.d, prep.num_rows
        logits = fused.logits(d["tokens"][:n], d["positions"][:n], PagedKVCache(self.pool, prep.layout),
                              d["sample_rows"][:n])
        packed = self.sampler(logits, self.inputs.d_params, [s.request for s in plan]).tolist()
        if any(row[1] > 0 for row in packed):
            return None, prep
        return ModelOutput([int(row[0]) for row in packed]), prep

    def _mask(self, prep: Prepared) -> Callable[[Tensor], None] | None:
        """What masks the sampled logits of rows held to a grammar (their bitmasks came with the step's inputs)."""
        masks = self.inputs.masks
        if not prep.masked or masks is None:
            return None
        return lambda logits: masks.apply(logits, self.inputs.d_mask, prep.masked)

    def _score(self, hidden: Tensor, n: int, k: int) -> Tensor:
        """(n, 1 + 2k): the log-prob of each scored row's next prompt token, then the top-k values and ids."""
        d = self.inputs.d
        lp = self.model.logits(hidden.index_select(0, d["score_rows"][:n])).float().log_softmax(-1)  # (n, V)
        cols = [lp.gather(1, d["score_targets"][:n, None])]
        if k:
            vals, idx = lp.topk(min(k, lp.size(1)), dim=-1)
            cols += [vals, idx.to(torch.float32)]
        return torch.cat(cols, dim=1)

    @staticmethod
    def _prompt_logprobs(out: ModelOutput, prep: Prepared, scores: list[float], k: int) -> None:
        width = 1 + 2 * k
        for i, (rid, position, token) in enumerate(prep.scored):
            row = scores[i * width : (i + 1) * width]
            top = tuple(TokenLogprob(int(row[1 + k + t]), row[1 + t]) for t in range(k))
            out.prompt_logprobs.setdefault(rid, {})[position] = PromptLogprob(token, row[0], top)

    @torch.inference_mode()
    def capture(self, encoder_ids: list[int], decoder_ids: list[int],
                layers: Mapping[str, Iterable[int]]) -> dict[tuple[str, int], Tensor]:
        """Inspection: one teacher-forced pass at batch 1 through the explicit attention path, no KV cache;
        the weights per (kind, layer) asked for, as (h, T_q, T_k) float32 on the CPU (encoder_ids [] for an LM)."""
        wanted = {k: set(v) for k, v in layers.items()}
        cap = AttentionCapture(wanted, {i for v in wanted.values() for i in v})
        dec = torch.tensor([decoder_ids], device=self.device)  # (1, T)
        if isinstance(self.model, Transformer):
            memory = self.model.encode(torch.tensor([encoder_ids], device=self.device), capture=cap)  # (1, S, d)
            if "decoder_self" in wanted or "cross" in wanted:
                self.model.decode(dec, memory=memory, capture=cap)
        else:
            self.model.decode(dec, capture=cap)
        return {key: w[0].float().cpu() for key, w in cap.weights.items() if key[1] in wanted.get(key[0], ())}

    def forward_decode(self, num_rows: int, layout: Any) -> Tensor:
        """The decode forward over the first num_rows rows of the input buffers (what a CUDA graph captures)."""
        d = self.inputs.d
        tokens, positions = d["tokens"][:num_rows][None], d["positions"][:num_rows][None]
        return self.model.decode(tokens, positions, cache=PagedKVCache(self.pool, layout))[0]

    def _encode(self, prep: Prepared) -> None:
        """Run the encoder once for translator requests that start, and store each layer's cross K/V."""
        assert isinstance(self.model, Transformer)
        src, valid = self.inputs.sources(len(prep.encode), prep.source_len)
        memory = self.model.encode(src, valid)  # (B, S, d_model)
        lens = [len(s.request.source_ids or []) for s in prep.encode]
        for i, layer in enumerate(self.model.decoder.layers):
            attn = layer.cross_attn
            assert isinstance(attn, MultiHeadAttention)
            k, v = attn.project_kv(memory)  # (B, h, S, d_k)
            for b, (s, n) in enumerate(zip(prep.encode, lens, strict=True)):
                self.pool.write_cross(i, s.table.slot or 0, k[b, :, :n].transpose(0, 1), v[b, :, :n].transpose(0, 1))

    # --- what comes back ------------------------------------------------------------------------------------------

    def _output(self, plan: list[ScheduledRequest], prep: Prepared, host: list[list[float]],
                cache: PagedKVCache | None, stuck: set[int]) -> ModelOutput:
        ids, errors = [-1] * len(plan), [None] * len(plan)  # type: list[int], list[str | None]
        want_lp = any(s.request.params.logprobs is not None for s in prep.sampled)
        lps: list[float] = [0.0] * len(plan)
        tops: list[tuple[TokenLogprob, ...]] = [()] * len(plan)
        attention: dict[str, dict[str, Any]] = {}
        k_all = (len(host[0]) - 3) // 2 if want_lp and host else 0
        for i, s in enumerate(plan):
            j = prep.sample_index[i]
            if j < 0:
                continue
            row = host[j]
            if row[1] > 0 and j in stuck:
                errors[i] = ERROR_STUCK
                continue
            if row[1] > 0:
                errors[i] = ERROR_NAN
                self.pool.clear(s.table.block_ids[s.table.own_start :], s.table.slot)  # K/V may hold NaN
                continue
            ids[i] = int(row[0])
            n_top = s.request.params.logprobs or 0
            if want_lp:
                lps[i] = row[2]
                tops[i] = tuple(TokenLogprob(int(row[3 + k_all + t]), row[3 + t]) for t in range(n_top))
            if cache is not None and s.request.attention is not None:
                attention[s.request.request_id] = self._rows(s, prep.tables[i], cache)
        return ModelOutput(ids, lps if want_lp else None, tops if want_lp else None, errors, attention)

    def _capture(self, plan: list[ScheduledRequest]) -> AttentionCapture | None:
        """A capture (the explicit attention path) only when some request in the batch asks for rows."""
        specs = [s.request.attention for s in plan if s.request.attention is not None]
        if not specs:
            return None
        layers = None if any(a.layers is None for a in specs) else {i for a in specs for i in a.layers or ()}
        return AttentionCapture({k for a in specs for k in a.kinds}, layers)

    def _rows(self, s: ScheduledRequest, table: int, cache: PagedKVCache) -> dict[str, Any]:
        """The request's row at its last new token (the query that predicts the next token)."""
        spec = s.request.attention
        assert spec is not None
        n_keys = {"decoder_self": s.start + s.num_new, "cross": len(s.request.source_ids or [])}
        heads = list(spec.heads) if spec.heads is not None else list(range(self.config.h))
        layers = spec.layers if spec.layers is not None else range(self.config.n_decoder_layers)
        rows: dict[str, Any] = {"query_position": s.start + s.num_new - 1}
        for kind in spec.kinds:
            w = torch.stack([cache.rows[(kind, i)][table][heads, : n_keys[kind]] for i in layers])  # (L, H, T_k)
            if spec.aggregation in ("mean", "max"):
                w = w.mean(1, keepdim=True) if spec.aggregation == "mean" else w.amax(1, keepdim=True)
            rows[kind] = w.double().round(decimals=6).tolist()
        return rows


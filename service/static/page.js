// The viewer's shared state and the helpers every view reads: which maps the result has, token labels (rows by
// the token read or predicted, generated ones flagged), the colour scale, the canvas.
import { maxOf, showTok } from "./matrices.js";

export const $ = (id) => document.getElementById(id);
export const KIND_NAMES = { encoder_self: "Encoder self-attention", decoder_self: "Decoder self-attention", cross: "Cross-attention" };
export const WINDOW = 40;  // the head view draws at most this many tokens a side: more is a tangle
export const state = {
  models: [], model: null, result: null, rollout: null, view: "heatmap", kind: null, layer: 0, head: "mean",
  heads: new Set(), focus: null, geom: null, base: null, current: null, width: 0, window: null,
  rowsBy: { alignment: "predicted" },  // per view: label decoder rows by the token read ("input") or predicted
};
export const isTranslator = () => state.model.details.architecture === "encoder-decoder";
// What the selects offer: the maps of the result, or before one (on load, after a model switch) what the model's card
// says it has (GET /v1/models: details.attention.kinds, each with its layers and heads).
const range = (n) => Array.from({ length: n }, (_, i) => i);
const cardKinds = () => (state.model && state.model.details.attention && state.model.details.attention.kinds) || {};
export const kindsOffered = () => (state.result ? [...new Set([...state.result.maps.values()].map((m) => m.kind))]
  : Object.keys(cardKinds()));
export const layersOf = (kind) => (state.result
  ? [...state.result.maps.values()].filter((m) => m.kind === kind).map((m) => m.layer)
  : range((cardKinds()[kind] || { layers: 0 }).layers));
export const allHeads = () => (state.result ? [...state.result.maps.values()][0].heads
  : range((Object.values(cardKinds())[0] || { heads: 0 }).heads));
export const tokensOf = (side) => (side === "encoder" ? state.result.encoder_tokens : state.result.decoder_tokens);
export const rowsBy = () => state.rowsBy[state.view] || "input";
// Labels and generated-flags of a side. Decoder rows may be labelled by the token each query predicts (the next one:
// a decoder reads token i to predict token i + 1), which lines a translation up with its source.
export function side(name, asRows = false) {
  const toks = tokensOf(name);
  if (asRows && name === "decoder" && rowsBy() === "predicted") {
    const next = toks.slice(1);
    return { labels: [...next.map((t) => showTok(t.text)), "⟨next⟩"], generated: [...next.map((t) => t.generated), false] };
  }
  return { labels: toks.map((t) => showTok(t.text)), generated: toks.map((t) => t.generated) };
}
export const rowsNote = () => (rowsBy() === "predicted" ? "rows: the token each query predicts" : "rows: the token each query reads");
export const skipSink = () => $("skip-sink").checked;
export const scaleOf = (m) => maxOf(m, skipSink());
export const headName = () => (typeof state.head === "number" ? `head ${state.head}` : `${state.head} of heads`);
export const kindName = (k) => (isTranslator() ? KIND_NAMES[k] : "Self-attention (causal)");


export const available = () => Math.max(320, $("canvas-wrap").clientWidth - 32);

export function showCanvas() {
  $("view").hidden = false;
  $("empty").hidden = true;
  return $("view");
}

export function setLegend(vmax) {
  const sink = skipSink() ? ", first key excluded" : "";
  $("legend-max").textContent = vmax === null ? `max (per map${sink})` : `${vmax.toFixed(3)}${sink ? " (first key excluded)" : ""}`;
}

export const marksNote = () => (state.result.generated_tokens ? " Green labels are generated tokens." : "");

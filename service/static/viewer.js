// The attention viewer's page: model picker, inspection requests, selection controls, which view to draw.
// Plain ES modules, no build step, no network beyond this server's own API. page.js holds the shared state,
// views.js draws, interact.js handles hover, click and export.
import { drawLegend } from "./draw.js";
import { hideTooltip, snapshot, wire } from "./interact.js";
import { AXES, HEAD_COLORS, api, matrix, unpack } from "./matrices.js";
import {
  $, allHeads, headName, isTranslator, kindName, kindsOffered, layersOf, marksNote, rowsBy, rowsNote, setLegend,
  side, state,
} from "./page.js";
import { alignmentView, headView, heatmap, modelView } from "./views.js";

const key = () => $("api-key").value.trim();
const mapsOf = (r) => new Map(r.maps.map((m) => [`${m.kind}/${m.layer}`, unpack(m)]));

// --- models and inspections ---------------------------------------------------------------------------------------
async function loadModels() {
  try {
    state.models = (await api("/v1/models", null, key())).data;
  } catch (e) {
    return showError(`Could not list the models: ${e.message}`);
  }
  const sel = $("model");
  sel.innerHTML = "";
  for (const m of state.models) sel.add(new Option(`${m.id}  (${m.details.architecture})`, m.id));
  const wanted = new URLSearchParams(location.search).get("model");
  if (wanted && state.models.some((m) => m.id === wanted)) sel.value = wanted;
  onModelChange();
}

// A switch forgets everything of the model before (its result, kinds, layer, status line and colour scale) and
// offers the new model's kinds, layers and heads at once.
function onModelChange() {
  state.model = state.models.find((m) => m.id === $("model").value) || null;
  state.result = state.rollout = state.window = null;
  Object.assign(state, { kind: null, layer: 0, head: "mean" });
  delete $("layer").dataset.touched;
  setStatus("");
  hideError();
  setLegend(null);
  if (!state.model) return;
  const d = state.model.details, translator = isTranslator();
  $("lm-fields").hidden = translator;
  $("mt-fields").hidden = !translator;
  $("tab-alignment").hidden = !translator;
  $("generate-label").textContent = translator ? "Generate the target when it is empty" : "Generate a continuation, then inspect";
  const layers = translator ? `${d.encoder_layers}+${d.decoder_layers}` : `${d.decoder_layers}`;
  $("model-info").textContent = `${d.architecture} · ${layers} layers × ${d.heads} heads · context ${d.context_length} tokens`;
  if (translator) $("generate").checked = !$("target").value.trim();
  if (state.view === "alignment" && !translator) setTab("heatmap");
  state.heads = new Set(allHeads());
  syncControls();
  showEmpty("Enter text and press Inspect.");
}

function inputs() {
  const body = { model: state.model.id };
  if (isTranslator()) {
    body.source = $("source").value;
    if ($("target").value) body.target = $("target").value;
  } else {
    body.prompt = $("prompt").value;
  }
  if ($("generate").checked && !body.target) {
    // an empty max tokens leaves the server's default (a translator's is sized to its source)
    const sampling = { temperature: Number($("temperature").value) || 0 }, max = Number($("max-tokens").value);
    if (max > 0) sampling.max_tokens = max;
    Object.assign(body, { generate: true, sampling });
    const kind = $("constraint-kind").value, text = $("constraint").value;  // a regex's spaces count
    if (kind && text.trim()) body.structured_outputs = { [kind]: constraintValue(kind, text) };
  }
  return body;
}

// The constraint field's text as structured_outputs wants it: choices a line each, a schema parsed.
function constraintValue(kind, text) {
  if (kind === "choice") return text.split("\n").map((line) => line.trim()).filter(Boolean);
  if (kind === "json") {
    try { return JSON.parse(text); } catch (e) { throw new Error(`the JSON schema is not JSON: ${e.message}`); }
  }
  return text;
}

async function inspect(selection) {
  if (!state.model) return;
  const asked = state.model;
  hideError();
  $("inspect").disabled = true;
  setStatus("Inspecting…");
  try {
    const t0 = performance.now();
    const res = await api("/v1/attention", { ...inputs(), encoding: "base64", stats: true, ...(selection || {}) }, key());
    if (state.model !== asked) return;  // the model was switched meanwhile: this result is no longer wanted
    state.result = { ...res, maps: mapsOf(res) };
    state.rollout = state.window = null;
    const n = res.decoder_tokens.length + (res.encoder_tokens || []).length;
    setStatus(`${asked.id} · ${n} tokens${res.generated_tokens ? ` (${res.generated_tokens} generated)` : ""} · ` +
      `${res.values.toLocaleString()} values · ${Math.round(performance.now() - t0)} ms`);
    if (!kindsOffered().includes(state.kind)) state.kind = kindsOffered()[0];
    state.heads = new Set(allHeads());
    await render();
  } catch (e) {
    if (state.model !== asked) return;
    setStatus("");
    showError(e.message, e.status === 413 ? suggestion(e.message) : null);
  } finally {
    $("inspect").disabled = false;
  }
}

// A 413 names a selection that fits, as JSON: offer it as a button.
function suggestion(message) {
  const m = message.match(/(\{.*\})/);
  try { return m ? JSON.parse(m[1]) : null; } catch { return null; }
}

async function loadRollout() {
  const r = state.result, body = { model: state.model.id, aggregation: "rollout", encoding: "base64" };
  if (isTranslator()) Object.assign(body, { source: r.encoder_text, target: r.decoder_text || undefined });
  else body.prompt = r.decoder_text;
  const before = $("status").textContent;
  setStatus("Computing rollout…");
  try {
    state.rollout = mapsOf(await api("/v1/attention", body, key()));
  } finally {
    setStatus(before);
  }
}

// --- selection controls -------------------------------------------------------------------------------------------
function fillSelect(sel, options, value) {
  sel.innerHTML = "";
  for (const [v, label] of options) sel.add(new Option(label, String(v)));
  const values = options.map(([v]) => String(v));
  sel.value = values.includes(String(value)) ? String(value) : values[0];
  return sel.value;
}

function syncControls() {
  const v = state.view;
  let kinds = kindsOffered();
  if (!kinds.length) return;
  if (v === "rollout") kinds = kinds.filter((k) => k !== "cross");
  if (v === "alignment") kinds = ["cross"];
  state.kind = fillSelect($("kind"), kinds.map((k) => [k, kindName(k)]), state.kind);
  const layers = layersOf(state.kind), last = layers[layers.length - 1];
  const layer = (v === "alignment" || v === "rollout") && !$("layer").dataset.touched ? last : state.layer;
  state.layer = Number(fillSelect($("layer"), layers.map((l) => [l, `layer ${l}`]), layer));
  const head = fillSelect($("head"), [["mean", "mean of heads"], ["max", "max of heads"],
    ...allHeads().map((h) => [h, `head ${h}`])], state.head);
  state.head = head === "mean" || head === "max" ? head : Number(head);
  $("kind-ctl").hidden = v === "alignment";
  $("layer-ctl").hidden = v === "model";
  $("head-ctl").hidden = v === "model" || v === "head" || v === "rollout";
  $("head-toggles").hidden = v !== "head";
  if (v === "head") drawHeadToggles();
  $("alignment-tokens").hidden = v !== "alignment";
  $("rows-ctl").hidden = v === "model" || v === "head" || AXES[state.kind][0] !== "decoder";
  $("rows").value = rowsBy();
  $("window-ctl").hidden = true;
}

function drawHeadToggles() {
  const box = $("head-toggles");
  box.innerHTML = "";
  for (const h of allHeads()) {
    const lab = document.createElement("label"), cb = document.createElement("input"), sw = document.createElement("span");
    cb.type = "checkbox";
    cb.checked = state.heads.has(h);
    cb.addEventListener("change", () => { cb.checked ? state.heads.add(h) : state.heads.delete(h); render(); });
    sw.className = "swatch";
    sw.style.background = HEAD_COLORS[h % HEAD_COLORS.length];
    lab.append(cb, sw, document.createTextNode(` ${h}`));
    box.append(lab);
  }
}

// --- the views ----------------------------------------------------------------------------------------------------
async function render() {
  if (!state.result) return syncControls();  // before an inspection: a choice of kind refills the layers
  document.body.dataset.rendered = "";
  state.width = $("canvas-wrap").clientWidth;
  if (state.view !== "head") state.focus = null;
  syncControls();
  hideTooltip();
  const v = state.view, [qs, ks] = AXES[state.kind], rowNote = qs === "decoder" ? ` · ${rowsNote()}` : "";
  let caption = "";
  if (v === "heatmap") {
    const m = matrix(state.result.maps.get(`${state.kind}/${state.layer}`), state.head);
    heatmap(m, side(qs, true), side(ks), `${kindName(state.kind)} · layer ${state.layer} · ${headName()}${rowNote}`);
    caption = `${m.Tq} queries × ${m.Tk} keys; each row sums to 1. Hover a cell for its weight.` + marksNote();
  } else if (v === "model") {
    caption = modelView();
  } else if (v === "head") {
    caption = headView();
  } else if (v === "alignment") {
    caption = alignmentView();
  } else if (v === "rollout") {
    if (!state.rollout) {
      try { await loadRollout(); } catch (e) { return showError(e.message); }
    }
    const m = matrix(state.rollout.get(`${state.kind}/${state.layer}`), "mean");
    heatmap(m, side(qs, true), side(ks), `Attention rollout · ${kindName(state.kind)} · through layer ${state.layer}${rowNote}`);
    caption = "Rollout (Abnar & Zuidema, 2020): per layer the mean over heads plus the identity (the residual), " +
      "rows renormalized, multiplied through the layers.";
  }
  if (state.geom.type !== "lines") snapshot(state);
  $("caption").textContent = caption;
  $("export-png").disabled = $("export-json").disabled = false;
  document.body.dataset.rendered = v;
}

// --- page state ---------------------------------------------------------------------------------------------------
function setTab(v) {
  state.view = v;
  for (const b of document.querySelectorAll(".tabs button")) b.classList.toggle("active", b.dataset.view === v);
}
function setView(v) {
  setTab(v);
  render();
}
function setStatus(text) { $("status").textContent = text; }
function hideError() { $("error").hidden = true; }
function showError(message, smaller) {
  const box = $("error");
  box.textContent = message;
  if (smaller) {
    const b = document.createElement("button");
    b.textContent = "Inspect the smaller selection";
    b.addEventListener("click", () => inspect(smaller));
    box.append(document.createElement("br"), b);
  }
  box.hidden = false;
}
function showEmpty(text) {
  document.body.dataset.rendered = "";
  $("view").hidden = true;
  $("empty").hidden = false;
  $("empty").textContent = text;
  $("caption").textContent = "";
  $("alignment-tokens").hidden = true;
  $("export-png").disabled = $("export-json").disabled = true;
}

$("input-form").addEventListener("submit", (ev) => { ev.preventDefault(); inspect(); });
$("model").addEventListener("change", onModelChange);
for (const b of document.querySelectorAll(".tabs button")) b.addEventListener("click", () => setView(b.dataset.view));
$("kind").addEventListener("change", () => { state.kind = $("kind").value; render(); });
$("layer").addEventListener("change", () => { state.layer = Number($("layer").value); $("layer").dataset.touched = "1"; render(); });
$("head").addEventListener("change", () => { const h = $("head").value; state.head = h === "mean" || h === "max" ? h : Number(h); render(); });
$("rows").addEventListener("change", () => { state.rowsBy[state.view] = $("rows").value; render(); });
$("skip-sink").addEventListener("change", render);
$("window").addEventListener("input", () => { state.window = Number($("window").value); render(); });
$("constraint-kind").addEventListener("change", () => { $("constraint").hidden = !$("constraint-kind").value; });
$("target").addEventListener("input", () => { if (state.model && isTranslator()) $("generate").checked = !$("target").value.trim(); });
wire({ state, setView, redrawLines: headView });
window.addEventListener("resize", () => {  // redraw to a new width; a height change needs nothing
  if (state.result && $("canvas-wrap").clientWidth !== state.width) render();
});
drawLegend($("legend"));
setLegend(null);
window.attentionViewer = { state, inspect, setView };
loadModels();

// The attention viewer's page: model picker, inspection requests, the five views, hover, export.
// Plain ES modules, no build step, no network beyond this server's own API.
import { drawGrid, drawLegend, drawLines, drawMatrix } from "./draw.js";
import { AXES, HEAD_COLORS, api, esc, fmt, matrix, maxOf, rowsOf, showTok, unpack, viridis } from "./matrices.js";

const $ = (id) => document.getElementById(id);
const KIND_NAMES = { encoder_self: "Encoder self-attention", decoder_self: "Decoder self-attention", cross: "Cross-attention" };
const state = {
  models: [], model: null, result: null, rollout: null, view: "heatmap", kind: null, layer: 0, head: "mean",
  heads: new Set(), focus: null, geom: null, base: null, current: null, width: 0,
};
const key = () => $("api-key").value.trim();
const isTranslator = () => state.model.details.architecture === "encoder-decoder";
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

function onModelChange() {
  state.model = state.models.find((m) => m.id === $("model").value) || null;
  state.result = state.rollout = null;
  if (!state.model) return;
  const d = state.model.details, translator = isTranslator();
  $("lm-fields").hidden = translator;
  $("mt-fields").hidden = !translator;
  $("tab-alignment").hidden = !translator;
  $("generate-label").textContent = translator ? "Generate the target when it is empty" : "Generate a continuation, then inspect";
  const layers = translator ? `${d.encoder_layers}+${d.decoder_layers}` : `${d.decoder_layers}`;
  $("model-info").textContent = `${d.architecture} · ${layers} layers × ${d.heads} heads · ≤ ${d.attention.limits.max_tokens} tokens`;
  if (state.view === "alignment" && !translator) setTab("heatmap");
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
    Object.assign(body, { generate: true, max_tokens: Number($("max-tokens").value) || 16,
      temperature: Number($("temperature").value) || 0 });
  }
  return body;
}

async function inspect(selection) {
  if (!state.model) return;
  hideError();
  $("inspect").disabled = true;
  setStatus("Inspecting…");
  try {
    const t0 = performance.now();
    const res = await api("/v1/attention", { ...inputs(), encoding: "base64", stats: true, ...(selection || {}) }, key());
    state.result = { ...res, maps: mapsOf(res) };
    state.rollout = null;
    const n = res.decoder_tokens.length + (res.encoder_tokens || []).length;
    setStatus(`${n} tokens${res.generated_tokens ? ` (${res.generated_tokens} generated)` : ""} · ` +
      `${res.values.toLocaleString()} values · ${Math.round(performance.now() - t0)} ms`);
    if (!kindsInResult().includes(state.kind)) state.kind = kindsInResult()[0];
    state.heads = new Set(allHeads());
    await render();
  } catch (e) {
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
const kindsInResult = () => [...new Set([...state.result.maps.values()].map((m) => m.kind))];
const layersOf = (kind) => [...state.result.maps.values()].filter((m) => m.kind === kind).map((m) => m.layer);
const allHeads = () => [...state.result.maps.values()][0].heads;
const tokensOf = (side) => (side === "encoder" ? state.result.encoder_tokens : state.result.decoder_tokens).map((t) => showTok(t.text));
const headName = () => (typeof state.head === "number" ? `head ${state.head}` : `${state.head} of heads`);
const kindName = (k) => (isTranslator() ? KIND_NAMES[k] : "Self-attention (causal)");

function fillSelect(sel, options, value) {
  sel.innerHTML = "";
  for (const [v, label] of options) sel.add(new Option(label, String(v)));
  const values = options.map(([v]) => String(v));
  sel.value = values.includes(String(value)) ? String(value) : values[0];
  return sel.value;
}

function syncControls() {
  const v = state.view;
  let kinds = kindsInResult();
  if (v === "rollout") kinds = kinds.filter((k) => k !== "cross");
  if (v === "alignment") kinds = ["cross"];
  state.kind = fillSelect($("kind"), kinds.map((k) => [k, kindName(k)]), state.kind);
  const layers = layersOf(state.kind), last = layers[layers.length - 1];
  const layer = v === "alignment" && !$("layer").dataset.touched ? last : state.layer;
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
const available = () => Math.max(320, $("canvas-wrap").clientWidth - 32);

function showCanvas() {
  $("view").hidden = false;
  $("empty").hidden = true;
  return $("view");
}

function heatmap(m, rows, cols, title, argmax = false) {
  state.geom = drawMatrix(showCanvas(), available(), m, rows, cols, title, argmax);
  setLegend(state.geom.vmax);
  state.current = { weights: rowsOf(m), queries: rows, keys: cols };
}

function modelView() {
  const kind = state.kind, layers = layersOf(kind), heads = allHeads(), [qs, ks] = AXES[kind];
  const cell = (layer, head) => {
    const map = state.result.maps.get(`${kind}/${layer}`);
    return { m: matrix(map, head), stat: map.stats && map.stats[map.heads.indexOf(head)] };
  };
  state.geom = drawGrid(showCanvas(), available(), layers, heads, cell);
  setLegend(null);
  state.current = { grid: layers.map((l) => heads.map((h) => rowsOf(cell(l, h).m))), layers, heads,
    queries: tokensOf(qs), keys: tokensOf(ks) };
  return `${kindName(kind)}: ${layers.length} layers × ${heads.length} heads, each on its own scale; ` +
    "H = mean row entropy (nats), first = share on the first token. Click a map to enlarge it.";
}

function headView() {
  const [qs, ks] = AXES[state.kind], rows = tokensOf(qs), cols = tokensOf(ks);
  const map = state.result.maps.get(`${state.kind}/${state.layer}`);
  const heads = allHeads().filter((h) => state.heads.has(h));
  const series = heads.map((h) => ({ color: HEAD_COLORS[h % HEAD_COLORS.length], m: matrix(map, h) }));
  state.geom = drawLines(showCanvas(), available(), rows, cols, [`queries (${qs})`, `keys (${ks})`], series, state.focus);
  state.base = null;
  setLegend(null);
  state.current = { heads, queries: rows, keys: cols, weights: series.map((s) => rowsOf(s.m)) };
  return `Layer ${state.layer}: each line joins a query to a key; its opacity is the weight, its color the head. ` +
    "Hover a query token to isolate its lines.";
}

function alignmentView() {
  const m = matrix(state.result.maps.get(`cross/${state.layer}`), state.head);
  heatmap(m, tokensOf("decoder"), tokensOf("encoder"), `Cross-attention alignment · layer ${state.layer} · ${headName()}`, true);
  const chips = (id, toks) => {
    const box = $(id);
    box.innerHTML = "";
    toks.forEach((t, k) => {
      const s = document.createElement("span");
      s.className = t.special ? "tok special" : "tok";
      s.textContent = showTok(t.text);
      s.dataset.index = k;
      box.append(s);
    });
    return box;
  };
  chips("align-source", state.result.encoder_tokens);
  const target = chips("align-target", state.result.decoder_tokens), vmax = maxOf(m);
  target.onmouseover = (ev) => {
    const i = ev.target.dataset && ev.target.dataset.index;
    if (i === undefined) return;
    for (const el of target.children) el.classList.toggle("active", el.dataset.index === i);
    for (const el of $("align-source").children) {
      const v = m.get(Number(i), Number(el.dataset.index)), c = viridis(v / vmax);
      el.style.background = `rgba(${c[0]},${c[1]},${c[2]},${0.08 + 0.8 * (v / vmax)})`;
      el.title = `weight ${v.toFixed(4)}`;
    }
  };
  return "Rows: target tokens; columns: source tokens; white dots mark each target token's strongest source token.";
}

async function render() {
  if (!state.result) return;
  document.body.dataset.rendered = "";
  state.width = $("canvas-wrap").clientWidth;
  if (state.view !== "head") state.focus = null;
  syncControls();
  hideTooltip();
  const v = state.view, [qs, ks] = AXES[state.kind];
  let caption = "";
  if (v === "heatmap") {
    const m = matrix(state.result.maps.get(`${state.kind}/${state.layer}`), state.head);
    heatmap(m, tokensOf(qs), tokensOf(ks), `${kindName(state.kind)} · layer ${state.layer} · ${headName()}`);
    caption = `${m.Tq} queries × ${m.Tk} keys; each row sums to 1. Hover a cell for its weight.`;
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
    heatmap(m, tokensOf(qs), tokensOf(ks), `Attention rollout · ${kindName(state.kind)} · through layer ${state.layer}`);
    caption = "Rollout (Abnar & Zuidema, 2020): per layer the mean over heads plus the identity (the residual), " +
      "rows renormalized, multiplied through the layers.";
  }
  if (state.geom.type !== "lines") snapshot();
  $("caption").textContent = caption;
  $("export-png").disabled = $("export-json").disabled = false;
  document.body.dataset.rendered = v;
}

// --- hover, click, export -----------------------------------------------------------------------------------------
function snapshot() {
  const c = $("view");
  state.base = c.getContext("2d").getImageData(0, 0, c.width, c.height);
}
function restore() { if (state.base) $("view").getContext("2d").putImageData(state.base, 0, 0); }
function hideTooltip() { $("tooltip").hidden = true; }
function tooltip(ev, html) {
  const t = $("tooltip"), wrap = $("canvas-wrap"), box = wrap.getBoundingClientRect();
  t.innerHTML = html;
  t.hidden = false;
  t.style.left = `${ev.clientX - box.left + wrap.scrollLeft + 14}px`;
  t.style.top = `${ev.clientY - box.top + wrap.scrollTop + 14}px`;
}
const gridCell = (g, x, y) => g.cells.find((k) => x >= k.x && x < k.x + k.size && y >= k.y && y < k.y + k.size);

function onMove(ev) {
  const g = state.geom, c = $("view"), r = c.getBoundingClientRect(), x = ev.clientX - r.left, y = ev.clientY - r.top;
  if (!g) return;
  if (g.type === "matrix") {
    const j = Math.floor((x - g.left) / g.cell), i = Math.floor((y - g.top) / g.cell);
    restore();
    if (i < 0 || j < 0 || i >= g.m.Tq || j >= g.m.Tk) return hideTooltip();
    const ctx = c.getContext("2d");
    ctx.strokeStyle = "#ef4444";
    ctx.lineWidth = 1.5;
    ctx.strokeRect(g.left, g.top + i * g.cell, g.cell * g.m.Tk, g.cell);
    ctx.strokeRect(g.left + j * g.cell, g.top, g.cell, g.cell * g.m.Tq);
    tooltip(ev, `<b>${fmt(g.m.get(i, j))}</b> &nbsp;${esc(g.rows[i])} <small>#${g.m.qStart + i}</small> → ` +
      `${esc(g.cols[j])} <small>#${j}</small>`);
  } else if (g.type === "lines") {
    const i = Math.floor((y - g.topPad) / g.lineH), focus = x < g.xl + 20 && i >= 0 && i < g.n ? i : null;
    if (focus !== state.focus) { state.focus = focus; headView(); }
  } else if (g.type === "grid") {
    const cell = gridCell(g, x, y);
    c.style.cursor = cell ? "pointer" : "default";
    if (cell) tooltip(ev, `layer ${cell.layer} · head ${cell.head} — click to enlarge`); else hideTooltip();
  }
}

function onClick(ev) {
  const g = state.geom, r = $("view").getBoundingClientRect();
  const cell = g && g.type === "grid" ? gridCell(g, ev.clientX - r.left, ev.clientY - r.top) : null;
  if (!cell) return;
  state.layer = cell.layer;
  state.head = cell.head;
  setView("heatmap");
}

function download(name, href) {
  const a = document.createElement("a");
  a.href = href;
  a.download = name;
  document.body.append(a);
  a.click();
  a.remove();
}
function exportPng() {
  restore();
  download(`attention-${state.model.id}-${state.view}.png`, $("view").toDataURL("image/png"));
}
function exportJson() {
  const data = { model: state.model.id, view: state.view, kind: state.kind, layer: state.layer, head: state.head,
    decoder_text: state.result.decoder_text, encoder_text: state.result.encoder_text, ...state.current };
  const url = URL.createObjectURL(new Blob([JSON.stringify(data)], { type: "application/json" }));
  download(`attention-${state.model.id}-${state.view}.json`, url);
  setTimeout(() => URL.revokeObjectURL(url), 1000);
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
  $("view").hidden = true;
  $("empty").hidden = false;
  $("empty").textContent = text;
  $("caption").textContent = "";
  $("alignment-tokens").hidden = true;
  $("export-png").disabled = $("export-json").disabled = true;
}
function setLegend(vmax) {
  $("legend-max").textContent = vmax === null ? "max (per map)" : vmax.toFixed(3);
}

$("input-form").addEventListener("submit", (ev) => { ev.preventDefault(); inspect(); });
$("model").addEventListener("change", onModelChange);
for (const b of document.querySelectorAll(".tabs button")) b.addEventListener("click", () => setView(b.dataset.view));
$("kind").addEventListener("change", () => { state.kind = $("kind").value; render(); });
$("layer").addEventListener("change", () => { state.layer = Number($("layer").value); $("layer").dataset.touched = "1"; render(); });
$("head").addEventListener("change", () => { const h = $("head").value; state.head = h === "mean" || h === "max" ? h : Number(h); render(); });
$("view").addEventListener("mousemove", onMove);
$("view").addEventListener("mouseleave", () => {
  hideTooltip();
  restore();
  if (state.geom && state.geom.type === "lines" && state.focus !== null) { state.focus = null; headView(); }
});
$("view").addEventListener("click", onClick);
$("export-png").addEventListener("click", exportPng);
$("export-json").addEventListener("click", exportJson);
window.addEventListener("resize", () => {  // redraw to a new width; a height change needs nothing
  if (state.result && $("canvas-wrap").clientWidth !== state.width) render();
});
drawLegend($("legend"));
setLegend(null);
window.attentionViewer = { state, inspect, setView };
loadModels();

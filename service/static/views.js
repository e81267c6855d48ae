// The views drawn on the canvas: heatmap, model view (layers x heads), head view (lines), alignment.
import { drawGrid, drawLines, drawMatrix } from "./draw.js";
import { AXES, HEAD_COLORS, matrix, rowsOf, showTok, viridis } from "./matrices.js";
import {
  $, WINDOW, allHeads, available, headName, kindName, layersOf, marksNote, rowsBy, rowsNote, scaleOf, setLegend,
  showCanvas, side, state,
} from "./page.js";

export function heatmap(m, rows, cols, title, argmax = false) {
  const marks = { rows: rows.generated, cols: cols.generated };
  state.geom = drawMatrix(showCanvas(), available(), m, rows.labels, cols.labels, title, { argmax, vmax: scaleOf(m), marks });
  setLegend(state.geom.vmax);
  state.current = { weights: rowsOf(m), queries: rows.labels, keys: cols.labels };
}

export function modelView() {
  const kind = state.kind, layers = layersOf(kind), heads = allHeads(), [qs, ks] = AXES[kind];
  const cell = (layer, head) => {
    const map = state.result.maps.get(`${kind}/${layer}`);
    return { m: matrix(map, head), stat: map.stats && map.stats[map.heads.indexOf(head)] };
  };
  state.geom = drawGrid(showCanvas(), available(), layers, heads, cell, scaleOf);
  setLegend(null);
  state.current = { grid: layers.map((l) => heads.map((h) => rowsOf(cell(l, h).m))), layers, heads,
    queries: side(qs).labels, keys: side(ks).labels };
  return `${kindName(kind)}: ${layers.length} layers × ${heads.length} heads, each on its own scale; ` +
    "H = mean row entropy (nats), first = share on the first token. Click a map to enlarge it.";
}

export function headView() {
  const [qs, ks] = AXES[state.kind], rows = side(qs), cols = side(ks), n = rows.labels.length;
  const map = state.result.maps.get(`${state.kind}/${state.layer}`);
  // long inputs: a window of WINDOW queries (and, for self-attention, the same keys), the last ones first
  const windowed = n > WINDOW, start = windowed ? Math.min(n - WINDOW, Math.max(0, state.window ?? n - WINDOW)) : 0;
  const end = windowed ? start + WINDOW : n, kStart = qs === ks ? start : 0, kEnd = qs === ks ? end : cols.labels.length;
  $("window-ctl").hidden = !windowed;
  if (windowed) {
    Object.assign($("window"), { min: 0, max: n - WINDOW, value: start });
    $("window-label").textContent = `${start}–${end - 1} of ${n}`;
  }
  const cut = (m) => ({ Tq: end - start, Tk: kEnd - kStart, qStart: start, get: (i, j) => m.get(i + start, j + kStart) });
  const heads = allHeads().filter((h) => state.heads.has(h));
  const series = heads.map((h) => ({ color: HEAD_COLORS[h % HEAD_COLORS.length], m: cut(matrix(map, h)) }));
  const rl = rows.labels.slice(start, end), cl = cols.labels.slice(kStart, kEnd);
  const marks = { rows: rows.generated.slice(start, end), cols: cols.generated.slice(kStart, kEnd) };
  state.geom = drawLines(showCanvas(), available(), rl, cl, [`queries (${qs})`, `keys (${ks})`], series, state.focus, marks);
  state.base = null;
  setLegend(null);
  state.current = { heads, queries: rl, keys: cl, weights: series.map((s) => rowsOf(s.m)) };
  return `Layer ${state.layer}: each line joins a query to a key; its opacity is the weight, its color the head. ` +
    "Hover a query token to isolate its lines." + (windowed ? ` Showing tokens ${start}–${end - 1} of ${n}` +
    (qs === ks ? " (lines to earlier keys are not drawn); slide to move." : "; slide to move.") : "") + marksNote();
}

export function alignmentView() {
  const m = matrix(state.result.maps.get(`cross/${state.layer}`), state.head), rows = side("decoder", true);
  heatmap(m, rows, side("encoder"), `Cross-attention alignment · layer ${state.layer} · ${headName()} · ${rowsNote()}`, true);
  const chips = (id, labels, special, generated) => {
    const box = $(id);
    box.innerHTML = "";
    labels.forEach((text, k) => {
      const s = document.createElement("span");
      s.className = "tok" + (special[k] ? " special" : "") + (generated[k] ? " generated" : "");
      s.textContent = text;
      s.dataset.index = k;
      box.append(s);
    });
    return box;
  };
  const src = state.result.encoder_tokens;
  chips("align-source", src.map((t) => showTok(t.text)), src.map((t) => t.special), src.map(() => false));
  const dec = state.result.decoder_tokens, special = rowsBy() === "predicted" ? [...dec.slice(1), { special: true }] : dec;
  const target = chips("align-target", rows.labels, special.map((t) => t.special), rows.generated), vmax = scaleOf(m);
  target.onmouseover = (ev) => {
    const i = ev.target.dataset && ev.target.dataset.index;
    if (i === undefined) return;
    for (const el of target.children) el.classList.toggle("active", el.dataset.index === i);
    for (const el of $("align-source").children) {
      const v = m.get(Number(i), Number(el.dataset.index)), t = Math.min(1, v / vmax), c = viridis(t);
      el.style.background = `rgba(${c[0]},${c[1]},${c[2]},${0.08 + 0.8 * t})`;
      el.title = `weight ${v.toFixed(4)}`;
    }
  };
  return (rowsBy() === "predicted" ? "Rows: the target token each decoder position predicts (it reads the one before); "
    : "Rows: the target token each decoder position reads (it predicts the next one); ") +
    "columns: source tokens; white dots mark each row's strongest source token." + marksNote();
}

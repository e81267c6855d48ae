// What the pointer and the export buttons do on the viewer's canvas: hover read-outs, the head view's focus,
// enlarging a grid cell, PNG and JSON export. `page` hands in the viewer's state and its two redraw hooks.
import { esc, fmt } from "./matrices.js";

const $ = (id) => document.getElementById(id);

export function snapshot(state) {
  const c = $("view");
  state.base = c.getContext("2d").getImageData(0, 0, c.width, c.height);
}
export function restore(state) { if (state.base) $("view").getContext("2d").putImageData(state.base, 0, 0); }
export function hideTooltip() { $("tooltip").hidden = true; }
function tooltip(ev, html) {
  const t = $("tooltip"), wrap = $("canvas-wrap"), box = wrap.getBoundingClientRect();
  t.innerHTML = html;
  t.hidden = false;
  t.style.left = `${ev.clientX - box.left + wrap.scrollLeft + 14}px`;
  t.style.top = `${ev.clientY - box.top + wrap.scrollTop + 14}px`;
}
const gridCell = (g, x, y) => g.cells.find((k) => x >= k.x && x < k.x + k.size && y >= k.y && y < k.y + k.size);

function onMove(page, ev) {
  const { state } = page, g = state.geom, c = $("view"), r = c.getBoundingClientRect();
  const x = ev.clientX - r.left, y = ev.clientY - r.top;
  if (!g) return;
  if (g.type === "matrix") {
    const j = Math.floor((x - g.left) / g.cell), i = Math.floor((y - g.top) / g.cell);
    restore(state);
    if (i < 0 || j < 0 || i >= g.m.Tq || j >= g.m.Tk) return hideTooltip();
    const ctx = c.getContext("2d");
    ctx.strokeStyle = "#ef4444";
    ctx.lineWidth = 1.5;
    ctx.strokeRect(g.left, g.top + i * g.cell, g.cell * g.m.Tk, g.cell);
    ctx.strokeRect(g.left + j * g.cell, g.top, g.cell, g.cell * g.m.Tq);
    tooltip(ev, `<b>${fmt(g.m.get(i, j))}</b> &nbsp;${esc(g.rows[g.m.qStart + i])} <small>#${g.m.qStart + i}</small> → ` +
      `${esc(g.cols[j])} <small>#${j}</small>`);
  } else if (g.type === "lines") {
    const i = Math.floor((y - g.topPad) / g.lineH), focus = x < g.xl + 20 && i >= 0 && i < g.n ? i : null;
    if (focus !== state.focus) { state.focus = focus; page.redrawLines(); }
  } else if (g.type === "grid") {
    const cell = gridCell(g, x, y);
    c.style.cursor = cell ? "pointer" : "default";
    if (cell) tooltip(ev, `layer ${cell.layer} · head ${cell.head} — click to enlarge`); else hideTooltip();
  }
}

function onClick(page, ev) {
  const { state } = page, g = state.geom, r = $("view").getBoundingClientRect();
  const cell = g && g.type === "grid" ? gridCell(g, ev.clientX - r.left, ev.clientY - r.top) : null;
  if (!cell) return;
  state.layer = cell.layer;
  state.head = cell.head;
  page.setView("heatmap");
}

function download(name, href) {
  const a = document.createElement("a");
  a.href = href;
  a.download = name;
  document.body.append(a);
  a.click();
  a.remove();
}
function exportPng(state) {
  restore(state);
  download(`attention-${state.model.id}-${state.view}.png`, $("view").toDataURL("image/png"));
}
function exportJson(state) {
  const data = { model: state.model.id, view: state.view, kind: state.kind, layer: state.layer, head: state.head,
    decoder_text: state.result.decoder_text, encoder_text: state.result.encoder_text, ...state.current };
  const url = URL.createObjectURL(new Blob([JSON.stringify(data)], { type: "application/json" }));
  download(`attention-${state.model.id}-${state.view}.json`, url);
  setTimeout(() => URL.revokeObjectURL(url), 1000);
}

// page: { state, setView(view), redrawLines() }
export function wire(page) {
  const { state } = page;
  $("view").addEventListener("mousemove", (ev) => onMove(page, ev));
  $("view").addEventListener("mouseleave", () => {
    hideTooltip();
    restore(state);
    if (state.geom && state.geom.type === "lines" && state.focus !== null) { state.focus = null; page.redrawLines(); }
  });
  $("view").addEventListener("click", (ev) => onClick(page, ev));
  $("export-png").addEventListener("click", () => exportPng(state));
  $("export-json").addEventListener("click", () => exportJson(state));
}

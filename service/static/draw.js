// Canvas drawings of attention: a labelled heatmap, a layers x heads grid of thumbnails, query-to-key lines.
// Each returns the geometry that hover and click need; nothing here knows about the page's state.
import { MASKED, maxOf, viridis } from "./matrices.js";

const MONO = "ui-monospace, SFMono-Regular, Menlo, Consolas, monospace";
const INK = "#1d2330", MUTED = "#667085", FRAME = "#d0d5dd", TITLE = "600 13px system-ui, sans-serif";
const GENERATED = "#047857";  // labels of generated tokens (prompt and source tokens stay ink)

// Size the canvas in CSS pixels (crisp on HiDPI screens), paint it white; the context works in CSS pixels.
export function sizeCanvas(c, width, height) {
  const dpr = window.devicePixelRatio || 1;
  c.width = Math.round(width * dpr);
  c.height = Math.round(height * dpr);
  c.style.width = `${width}px`;
  c.style.height = `${height}px`;
  const ctx = c.getContext("2d", { willReadFrequently: true });  // hover restores from a snapshot
  ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
  ctx.fillStyle = "#fff";
  ctx.fillRect(0, 0, width, height);
  ctx.font = `12px ${MONO}`;
  ctx.textBaseline = "middle";
  return ctx;
}

function textWidth(labels, min, max, font = `12px ${MONO}`) {
  const ctx = document.createElement("canvas").getContext("2d");
  ctx.font = font;
  return Math.min(max, Math.max(min, ...labels.map((t) => ctx.measureText(t).width)));
}

// The matrix as a T_k x T_q bitmap (one pixel per cell), to be scaled up without smoothing.
function bitmap(m, vmax) {
  const off = document.createElement("canvas");
  off.width = m.Tk;
  off.height = m.Tq;
  const octx = off.getContext("2d"), img = octx.createImageData(m.Tk, m.Tq);
  for (let i = 0; i < m.Tq; i++) {
    for (let j = 0; j < m.Tk; j++) {
      const v = m.get(i, j), c = v === null ? MASKED : viridis(v / vmax), p = 4 * (i * m.Tk + j);
      img.data[p] = c[0]; img.data[p + 1] = c[1]; img.data[p + 2] = c[2]; img.data[p + 3] = 255;
    }
  }
  octx.putImageData(img, 0, 0);
  return off;
}

// Rows are queries, columns keys; colors scale to vmax (default the matrix's own max; larger values saturate).
// argmax: a dot on each row's maximum; marks: {rows, cols} flags of generated tokens, labelled in green.
export function drawMatrix(c, avail, m, rows, cols, title, { argmax = false, vmax = null, marks = null } = {}) {
  const left = textWidth(rows, 0, 140) + 12, top = textWidth(cols, 0, 140) + 40;
  const cell = Math.max(2, Math.min(40, Math.floor((avail - left - 20) / m.Tk)));
  const width = Math.max(left + cell * m.Tk + 20, textWidth([title], 0, avail, TITLE) + 12);
  const ctx = sizeCanvas(c, width, top + cell * m.Tq + 16);
  vmax = vmax || maxOf(m);
  const ink = (flags, k) => (flags && flags[k] ? GENERATED : "#344054");
  ctx.fillStyle = INK;
  ctx.font = TITLE;
  ctx.fillText(title, 4, 12);
  ctx.imageSmoothingEnabled = false;
  ctx.drawImage(bitmap(m, vmax), left, top, cell * m.Tk, cell * m.Tq);
  ctx.font = `${Math.min(12, Math.max(8, cell - 2))}px ${MONO}`;
  const every = Math.max(1, Math.ceil(10 / cell));  // label every n-th token when cells are small
  ctx.textAlign = "right";
  for (let i = 0; i < m.Tq; i += every) {
    ctx.fillStyle = ink(marks && marks.rows, m.qStart + i);
    ctx.fillText(rows[m.qStart + i] ?? "", left - 6, top + (i + 0.5) * cell);
  }
  ctx.textAlign = "left";
  for (let j = 0; j < m.Tk; j += every) {
    ctx.fillStyle = ink(marks && marks.cols, j);
    ctx.save();
    ctx.translate(left + (j + 0.5) * cell, top - 6);
    ctx.rotate(-Math.PI / 2);
    ctx.fillText(cols[j] ?? "", 0, 0);
    ctx.restore();
  }
  if (argmax) {
    ctx.fillStyle = "#ffffff";
    for (let i = 0; i < m.Tq; i++) {
      let best = -1, bj = 0;
      for (let j = 0; j < m.Tk; j++) { const v = m.get(i, j); if (v !== null && v > best) { best = v; bj = j; } }
      ctx.beginPath();
      ctx.arc(left + (bj + 0.5) * cell, top + (i + 0.5) * cell, Math.max(1.5, cell / 6), 0, 2 * Math.PI);
      ctx.fill();
    }
  }
  ctx.strokeStyle = FRAME;
  ctx.strokeRect(left - 0.5, top - 0.5, cell * m.Tk + 1, cell * m.Tq + 1);
  return { type: "matrix", left, top, cell, m, rows, cols, vmax };
}

// A thumbnail per (layer, head), each on its own color scale (scale(m), default its max); cell(layer, head) -> {m, stat}.
export function drawGrid(c, avail, layers, heads, cell, scale = maxOf) {
  const pad = 14, header = 22, side = 34, caption = 14;
  const thumb = Math.max(56, Math.min(132, Math.floor((avail - side) / heads.length) - pad));
  const ctx = sizeCanvas(c, side + heads.length * (thumb + pad), header + layers.length * (thumb + pad + caption) + 8);
  ctx.font = "600 11px system-ui, sans-serif";
  ctx.fillStyle = MUTED;
  ctx.textAlign = "center";
  heads.forEach((h, k) => ctx.fillText(`head ${h}`, side + k * (thumb + pad) + thumb / 2, 10));
  const cells = [];
  layers.forEach((layer, r) => {
    const y = header + r * (thumb + pad + caption);
    ctx.save();
    ctx.fillStyle = MUTED;
    ctx.translate(12, y + thumb / 2);
    ctx.rotate(-Math.PI / 2);
    ctx.fillText(`layer ${layer}`, 0, 0);
    ctx.restore();
    heads.forEach((head, k) => {
      const x = side + k * (thumb + pad), { m, stat } = cell(layer, head);
      ctx.imageSmoothingEnabled = false;
      ctx.drawImage(bitmap(m, scale(m)), x, y, thumb, thumb);
      ctx.strokeStyle = FRAME;
      ctx.strokeRect(x - 0.5, y - 0.5, thumb + 1, thumb + 1);
      if (stat) {
        ctx.fillStyle = MUTED;
        ctx.font = "10px system-ui, sans-serif";
        ctx.fillText(`H ${stat.entropy.toFixed(2)} · first ${(100 * stat.first_token).toFixed(0)}%`, x + thumb / 2, y + thumb + 9);
        ctx.font = "600 11px system-ui, sans-serif";
      }
      cells.push({ x, y, size: thumb, layer, head });
    });
  });
  return { type: "grid", cells };
}

// Query tokens left, key tokens right, a line per weight (opacity = weight, color = head); focus: one query;
// marks: {rows, cols} flags of generated tokens, labelled in green.
export function drawLines(c, avail, rows, cols, titles, series, focus, marks = null) {
  const lineH = 20, topPad = 30, wl = textWidth(rows, 110, 400) + 16, wr = textWidth(cols, 110, 400) + 16;
  const w = Math.min(avail, wl + wr + 420);
  const ctx = sizeCanvas(c, w, topPad + Math.max(rows.length, cols.length) * lineH + 10), xl = wl, xr = w - wr;
  ctx.font = "600 11px system-ui, sans-serif";
  ctx.fillStyle = MUTED;
  ctx.textAlign = "right";
  ctx.fillText(titles[0], xl - 6, 10);
  ctx.textAlign = "left";
  ctx.fillText(titles[1], xr + 6, 10);
  ctx.lineWidth = 2;
  for (const { color, m } of series) {
    ctx.strokeStyle = color;
    for (let i = 0; i < m.Tq; i++) {
      if (focus !== null && focus !== i) continue;
      for (let j = 0; j < m.Tk; j++) {
        const v = m.get(i, j);
        if (v === null || v < 0.02) continue;
        ctx.globalAlpha = Math.min(1, (v * (focus === null ? 0.9 : 1.2)) / Math.sqrt(series.length));
        ctx.beginPath();
        ctx.moveTo(xl, topPad + (i + 0.5) * lineH);
        ctx.lineTo(xr, topPad + (j + 0.5) * lineH);
        ctx.stroke();
      }
    }
  }
  ctx.globalAlpha = 1;
  ctx.font = `12px ${MONO}`;
  ctx.textAlign = "right";
  const ink = (flags, k) => (flags && flags[k] ? GENERATED : INK);
  rows.forEach((t, i) => {
    ctx.fillStyle = focus === i ? "#4f46e5" : ink(marks && marks.rows, i);
    ctx.fillText(t, xl - 6, topPad + (i + 0.5) * lineH);
  });
  ctx.textAlign = "left";
  cols.forEach((t, j) => { ctx.fillStyle = ink(marks && marks.cols, j); ctx.fillText(t, xr + 6, topPad + (j + 0.5) * lineH); });
  return { type: "lines", xl, xr, topPad, lineH, n: rows.length };
}

// The color scale swatch beside the views.
export function drawLegend(c) {
  const ctx = c.getContext("2d");
  for (let x = 0; x < c.width; x++) { ctx.fillStyle = `rgb(${viridis(x / (c.width - 1))})`; ctx.fillRect(x, 0, 1, c.height); }
}

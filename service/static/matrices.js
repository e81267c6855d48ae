// Attention maps from the API as matrices: float16/base64 decoding, head aggregation, colors, token labels.

export const VIRIDIS = [[68, 1, 84], [72, 35, 116], [64, 67, 135], [52, 94, 141], [41, 120, 142], [32, 144, 140],
  [34, 167, 132], [68, 190, 112], [121, 209, 81], [189, 222, 38], [253, 231, 37]];
export const HEAD_COLORS = ["#4f46e5", "#e11d48", "#059669", "#d97706", "#0891b2", "#7c3aed", "#db2777", "#65a30d",
  "#2563eb", "#ea580c", "#0d9488", "#9333ea"];
export const MASKED = [228, 228, 231];
export const AXES = { encoder_self: ["encoder", "encoder"], decoder_self: ["decoder", "decoder"], cross: ["decoder", "encoder"] };

export function viridis(t) {
  const x = Math.min(1, Math.max(0, t)) * (VIRIDIS.length - 1);
  const i = Math.min(VIRIDIS.length - 2, Math.floor(x)), f = x - i;
  return VIRIDIS[i].map((c, k) => Math.round(c + f * (VIRIDIS[i + 1][k] - c)));
}
export const fmt = (v) => (v === null ? "masked" : v.toFixed(4));
export const showTok = (t) => t.replace(/\n/g, "↵").replace(/\t/g, "⇥").replace(/ /g, "␣") || "∅";
export const esc = (s) => String(s).replace(/[&<>"]/g, (ch) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;" })[ch]);

function halfToFloat(h) {
  const s = h & 0x8000 ? -1 : 1, e = (h >> 10) & 0x1f, f = h & 0x3ff;
  if (e === 0) return s * 2 ** -14 * (f / 1024);
  if (e === 31) return f ? NaN : s * Infinity;
  return s * 2 ** (e - 15) * (1 + f / 1024);
}

// {dtype: "float16", shape, byteorder: "little", data: base64} -> Float32Array (row-major).
export function decodeArray(enc) {
  const bin = atob(enc.data), bytes = new Uint8Array(bin.length);
  for (let i = 0; i < bin.length; i++) bytes[i] = bin.charCodeAt(i);
  const view = new DataView(bytes.buffer), n = enc.shape.reduce((a, b) => a * b, 1), out = new Float32Array(n);
  for (let i = 0; i < n; i++) out[i] = halfToFloat(view.getUint16(2 * i, true));
  return out;
}

// One API map (base64) -> get(head, i, j): the weight, or null where the cell is masked (causal).
export function unpack(m) {
  const [H, Tq, Tk] = m.shape, data = decodeArray(m.data);
  return {
    kind: m.kind, layer: m.layer, heads: m.heads, aggregation: m.aggregation, H, Tq, Tk, qStart: m.query_start,
    causal: m.causal, stats: m.stats || null,
    get(a, i, j) { return this.causal && j > this.qStart + i ? null : data[(a * Tq + i) * Tk + j]; },
  };
}

// One (T_q, T_k) matrix of a map: a head by its index, or "mean" / "max" over the map's heads.
export function matrix(map, head) {
  const pick = typeof head === "number" ? map.heads.indexOf(head) : -1;
  const get = (i, j) => {
    if (pick >= 0 || map.H === 1) return map.get(Math.max(pick, 0), i, j);
    let acc = head === "max" ? -Infinity : 0;
    for (let a = 0; a < map.H; a++) {
      const v = map.get(a, i, j);
      if (v === null) return null;
      acc = head === "max" ? Math.max(acc, v) : acc + v / map.H;
    }
    return acc;
  };
  return { Tq: map.Tq, Tk: map.Tk, qStart: map.qStart, get };
}

// The largest weight, the colour scale's top; skipFirst leaves out key 0, where an attention sink would set the
// scale and leave everything else nearly black.
export function maxOf(m, skipFirst = false) {
  let top = 0;
  const from = skipFirst && m.Tk > 1 ? 1 : 0;
  for (let i = 0; i < m.Tq; i++) for (let j = from; j < m.Tk; j++) { const v = m.get(i, j); if (v !== null && v > top) top = v; }
  return top || 1;
}
export const rowsOf = (m) => Array.from({ length: m.Tq }, (_, i) => Array.from({ length: m.Tk }, (_, j) => m.get(i, j)));

// GET (no body) or POST JSON to this server; errors carry the API's message and the HTTP status.
export async function api(path, body, key) {
  const headers = { "Content-Type": "application/json" };
  if (key) headers.Authorization = "Bearer " + key;
  const r = await fetch(path, body ? { method: "POST", headers, body: JSON.stringify(body) } : { headers });
  const data = await r.json().catch(() => null);
  if (!r.ok) {
    const err = new Error((data && data.error && data.error.message) || `HTTP ${r.status}`);
    err.status = r.status;
    throw err;
  }
  return data;
}

"""Wire encodings of the maps: JSON rows (masked cells null), base64 little-endian arrays, sparse rows."""

from __future__ import annotations

import base64
from typing import Any

import numpy as np

from service.inspection.maps import MapData, Sparse


def encode_array(a: np.ndarray, dtype: str) -> dict[str, Any]:
    """Row-major little-endian bytes of `a` as `dtype`, base64."""
    raw = np.ascontiguousarray(a, dtype=np.dtype(dtype).newbyteorder("<")).tobytes()
    return {"dtype": dtype, "shape": list(a.shape), "byteorder": "little", "data": base64.b64encode(raw).decode()}


def decode_array(enc: dict[str, Any]) -> np.ndarray:
    """The inverse of encode_array (what a client does)."""
    dt = np.dtype(enc["dtype"]).newbyteorder("<")
    return np.frombuffer(base64.b64decode(enc["data"]), dtype=dt).reshape(enc["shape"])


def json_rows(m: MapData, precision: int) -> list[list[list[float | None]]]:
    """Dense weights rounded, with masked (causal) cells as null."""
    rows: list[list[list[float | None]]] = m.weights.double().numpy().round(precision).tolist()
    if m.causal:
        for head in rows:
            for i, row in enumerate(head):
                start = m.q_start + i + 1
                row[start:] = [None] * (len(row) - start)
    return rows


def mask_text(m: MapData) -> str | None:
    if not m.causal:
        return None
    return (f"causal: cell (h, i, j) is masked (not attendable; 0 in data) where key j > query position "
            f"{m.q_start} + i")


def sparse_fields(s: Sparse, m: MapData, encoding: str, precision: int) -> dict[str, Any]:
    h, t_q = m.weights.shape[:2]
    out: dict[str, Any] = {"kept_mass": s.kept_mass.astype(np.float64).round(6).tolist(),
                           "kept_mass_min": round(float(s.kept_mass.min()), 6),
                           "kept_mass_mean": round(float(s.kept_mass.mean()), 6)}
    if encoding == "base64":
        index_dtype = "uint16" if m.weights.shape[-1] < 2**16 else "int32"
        out |= {"row_ptr": encode_array(s.row_ptr, "int32"), "indices_data": encode_array(s.indices, index_dtype),
                "values_data": encode_array(s.values, "float16")}
        return out
    ptr, idx, val = s.row_ptr.tolist(), s.indices.tolist(), s.values.astype(np.float64).round(precision).tolist()
    rows = [(idx[ptr[r]:ptr[r + 1]], val[ptr[r]:ptr[r + 1]]) for r in range(h * t_q)]
    out["indices"] = [[rows[a * t_q + i][0] for i in range(t_q)] for a in range(h)]
    out["values"] = [[rows[a * t_q + i][1] for i in range(t_q)] for a in range(h)]
    return out

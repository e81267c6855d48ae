// The paged-attention kernel's AVX-512 path for one work item (a query row's group of G query heads over one K/V
// head), for blocks of 16 keys and head sizes D of 64 or 128: the common shapes, written so that nothing per key
// goes through memory or a horizontal sum.
//
// The portable loop (paged_attention.cpp) does, for every key and query head, a dot product ending in a 16-lane
// horizontal sum, and adds p * v into an output row kept in memory: at 32 decode rows it ran ~3x slower than the
// attention's memory traffic. Here, per block of 16 keys:
// - each key is loaded (and widened from bfloat16) once for the G query heads; each head's 16 partial dot
//   products are summed across lanes together, one tree of shuffles for all 16 keys (`lane_sums`), so the block's
//   scores are one register per head;
// - the online softmax runs on that register (the same exp polynomial as the portable loop, vectorized);
// - the weighted values accumulate in registers (G x D/16 of them) for the whole row.
// Included by paged_attention.cpp inside its anonymous namespace, after `load16` and `exp_nonpositive`.
#pragma once

// e^x, lane by lane, for x <= 0: exp_nonpositive's polynomial on 16 lanes.
inline __m512 exp16(__m512 x) {
  const __m512 y = _mm512_mul_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.f)), _mm512_set1_ps(1.44269504088896341f));
  const __m512 n = _mm512_roundscale_ps(_mm512_add_ps(y, _mm512_set1_ps(0.5f)),
                                        _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(y, n);
  __m512 p = _mm512_set1_ps(1.535336188319500e-4f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.339887440266574e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.618437357674640e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.550332471162809e-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.402264791363012e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.931472028550421e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f));
  const __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
  return _mm512_mul_ps(p, _mm512_castsi512_ps(e));
}

// Lane t of the result = the sum of v[t]'s 16 lanes, for 16 vectors: pairs of vectors, then pairs of pairs, are
// interleaved and added (45 instructions instead of 16 horizontal sums of ~8 each).
inline __m512 lane_sums(const __m512 (&v)[16]) {
  __m512 a[8], b[4], c[2];
  for (int i = 0; i < 8; ++i)  // per 128-bit lane: (t, t+1, t, t+1) partial sums, t = 2i
    a[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  for (int i = 0; i < 4; ++i) {  // per 128-bit lane: (t .. t+3), t = 4i
    const __m512d x = _mm512_castps_pd(a[2 * i]), y = _mm512_castps_pd(a[2 * i + 1]);
    b[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)), _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
  }
  for (int i = 0; i < 2; ++i)  // 128-bit lanes: (b0 lanes 0+1, b0 2+3, b1 0+1, b1 2+3)
    c[i] = _mm512_add_ps(_mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], 0x88),
                         _mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], 0xDD));
  return _mm512_add_ps(_mm512_shuffle_f32x4(c[0], c[1], 0x88), _mm512_shuffle_f32x4(c[0], c[1], 0xDD));
}

// One work item: queries qf (G x D, float32, already scaled) over `len` keys of `table` (blocks of 16, K/V head
// offsets applied to kp/vp; k_block and k_token are the pool's strides), the result (G x D) into out.
template <typename T, int D, int G>
void attend_item(const float* qf, const T* kp, const T* vp, const int64_t* table, int64_t len,
                 int64_t k_block, int64_t k_token, float* out) {
  constexpr int C = D / 16;  // registers per head row
  __m512 acc[G][C];
  float m[G], l[G];
  for (int i = 0; i < G; ++i) {
    for (int c = 0; c < C; ++c) acc[i][c] = _mm512_setzero_ps();
    m[i] = -std::numeric_limits<float>::infinity();
    l[i] = 0.f;
  }
  __m512 parts[G][16];
  alignas(64) float p[G][16];
  for (int64_t b = 0; b * 16 < len; ++b) {
    const int64_t nt = std::min<int64_t>(16, len - b * 16);
    const T* kb = kp + table[b] * k_block;
    const T* vb = vp + table[b] * k_block;
    for (int64_t t = 0; t < 16; ++t) {  // each key once, for the group's queries
      if (t >= nt) {
        for (int i = 0; i < G; ++i) parts[i][t] = _mm512_setzero_ps();
        continue;
      }
      __m512 k[C];
      for (int c = 0; c < C; ++c) k[c] = load16(kb + t * k_token + c * 16);
      for (int i = 0; i < G; ++i) {
        __m512 s = _mm512_mul_ps(_mm512_loadu_ps(qf + i * D), k[0]);
        for (int c = 1; c < C; ++c) s = _mm512_fmadd_ps(_mm512_loadu_ps(qf + i * D + c * 16), k[c], s);
        parts[i][t] = s;
      }
    }
    const __mmask16 valid = static_cast<__mmask16>((1u << nt) - 1u);
    for (int i = 0; i < G; ++i) {  // the block's scores, the new running maximum, weights, rescaled sums
      const __m512 s = _mm512_mask_mov_ps(_mm512_set1_ps(-std::numeric_limits<float>::infinity()), valid,
                                          lane_sums(parts[i]));
      const float best = std::max(m[i], _mm512_reduce_max_ps(s));
      const __m512 w = _mm512_maskz_mov_ps(valid, exp16(_mm512_sub_ps(s, _mm512_set1_ps(best))));
      const float rescale = exp_nonpositive(m[i] - best);  // ~0 on the first block (m = -inf)
      l[i] = l[i] * rescale + _mm512_reduce_add_ps(w);
      m[i] = best;
      const __m512 r = _mm512_set1_ps(rescale);
      for (int c = 0; c < C; ++c) acc[i][c] = _mm512_mul_ps(acc[i][c], r);
      _mm512_store_ps(p[i], w);
    }
    for (int64_t t = 0; t < nt; ++t) {  // the weighted values, each value row once for the group
      __m512 v[C];
      for (int c = 0; c < C; ++c) v[c] = load16(vb + t * k_token + c * 16);
      for (int i = 0; i < G; ++i) {
        const __m512 pt = _mm512_set1_ps(p[i][t]);
        for (int c = 0; c < C; ++c) acc[i][c] = _mm512_fmadd_ps(pt, v[c], acc[i][c]);
      }
    }
  }
  for (int i = 0; i < G; ++i) {  // a row with no key (never in practice) gives zeros
    const __m512 inv = _mm512_set1_ps(l[i] > 0.f ? 1.f / l[i] : 0.f);
    for (int c = 0; c < C; ++c) _mm512_storeu_ps(out + i * D + c * 16, _mm512_mul_ps(acc[i][c], inv));
  }
}

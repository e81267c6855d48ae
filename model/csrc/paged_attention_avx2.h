// The paged-attention kernel's AVX2 + FMA path for one work item (a query row's group of G query heads over one
// K/V head), for blocks of 16 keys and head sizes D of 64 or 128: paged_attention_avx512.h's plan in 8-lane
// registers, for CPUs without AVX-512.
//
// The portable loop ends every key's dot product, per query head, in a horizontal sum, and adds p * v into an
// output row in memory once per key: on a 2-core Zen 3 it took ~27% of SmolLM2's decode step at 32 rows and 400
// keys. Here, per block of 16 keys:
// - each key is loaded (and widened from bfloat16) once for the G query heads; each head's 8-lane partial dot
//   products of 8 keys are summed across lanes together (`lane_sums8`), so 8 scores are one register;
// - the online softmax runs on those two registers per head (exp_nonpositive's polynomial on 8 lanes);
// - the output rows are updated per 8 of their D values: that slice of the G rows stays in registers while the
//   block's 16 value rows are added in, so each output slice is loaded and stored once per block, not per key.
// Included by paged_attention.cpp inside its anonymous namespace, after avx2_lanes.h (`load8`, `hmax8`) and
// `exp_nonpositive`.
#pragma once

// e^x, lane by lane, for x <= 0: exp_nonpositive's polynomial on 8 lanes.
inline __m256 exp8(__m256 x) {
  const __m256 y = _mm256_mul_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.f)), _mm256_set1_ps(1.44269504088896341f));
  const __m256 n = _mm256_floor_ps(_mm256_add_ps(y, _mm256_set1_ps(0.5f)));
  const __m256 f = _mm256_sub_ps(y, n);
  __m256 p = _mm256_set1_ps(1.535336188319500e-4f);
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.339887440266574e-3f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(9.618437357674640e-3f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(5.550332471162809e-2f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(2.402264791363012e-1f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(6.931472028550421e-1f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.f));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

// Lane t of the result = the sum of v[t]'s 8 lanes, for 8 vectors: two rounds of pairwise horizontal adds leave
// each 128-bit half holding 4 vectors' half sums; the halves are then exchanged and added.
inline __m256 lane_sums8(const float (*v)[8]) {
  __m256 a[4];
  for (int i = 0; i < 4; ++i) a[i] = _mm256_hadd_ps(_mm256_load_ps(v[2 * i]), _mm256_load_ps(v[2 * i + 1]));
  const __m256 b0 = _mm256_hadd_ps(a[0], a[1]), b1 = _mm256_hadd_ps(a[2], a[3]);  // keys 0-3, 4-7 by half
  return _mm256_add_ps(_mm256_permute2f128_ps(b0, b1, 0x20), _mm256_permute2f128_ps(b0, b1, 0x31));
}

inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

// The 16 keys of block b's partial dot products for the group's queries into parts (zeros past nt keys): each key
// is loaded (and widened) once for the G heads.
template <typename T, int D, int G>
inline void block_scores(const float* qf, const T* kb, int64_t nt, int64_t k_token, float (*parts)[16][8]) {
  constexpr int C = D / 8;
  for (int64_t t = 0; t < 16; ++t) {
    if (t >= nt) {
      for (int i = 0; i < G; ++i) _mm256_store_ps(parts[i][t], _mm256_setzero_ps());
      continue;
    }
    __m256 k[C];
    for (int c = 0; c < C; ++c) k[c] = load8(kb + t * k_token + c * 8);
    for (int i = 0; i < G; ++i) {
      __m256 s = _mm256_mul_ps(_mm256_loadu_ps(qf + i * D), k[0]);
      for (int c = 1; c < C; ++c) s = _mm256_fmadd_ps(_mm256_loadu_ps(qf + i * D + c * 8), k[c], s);
      _mm256_store_ps(parts[i][t], s);
    }
  }
}

// One work item: queries qf (G x D, float32, already scaled) over `len` keys of `table` (blocks of 16, K/V head
// offsets applied to kp/vp; k_block and k_token are the pool's strides), the result (G x D) into out.
// The scores of block b + 1 are computed before block b's values are added in: the softmax of a block is a chain
// of dependent instructions (lane sums, maximum, exponentials, sums), and the next block's independent products,
// issued right behind it, keep the core busy while it resolves. The values go into two sums per head (even and odd
// keys), so the FMA chains are half as long. (Both: 32 rows' layer 3-10% faster at 150-400 keys on a 2-core Zen 3.)
template <typename T, int D, int G>
void attend_item(const float* qf, const T* kp, const T* vp, const int64_t* table, int64_t len,
                 int64_t k_block, int64_t k_token, float* out) {
  constexpr int C = D / 8;  // registers per head row
  alignas(32) float acc[G][D], parts[2][G][16][8], p[G][16];
  float m[G], l[G], rescale[G];
  for (int i = 0; i < G; ++i) {
    for (int c = 0; c < D; ++c) acc[i][c] = 0.f;
    m[i] = -std::numeric_limits<float>::infinity();
    l[i] = 0.f;
  }
  const __m256 lanes = _mm256_setr_ps(0.f, 1.f, 2.f, 3.f, 4.f, 5.f, 6.f, 7.f);
  const int64_t blocks = (len + 15) / 16;
  if (blocks > 0) block_scores<T, D, G>(qf, kp + table[0] * k_block, std::min<int64_t>(16, len), k_token, parts[0]);
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t nt = std::min<int64_t>(16, len - b * 16);
    const T* vb = vp + table[b] * k_block;
    float (*cur)[16][8] = parts[b & 1];
    const __m256 ninf = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
    const __m256 valid[2] = {_mm256_cmp_ps(lanes, _mm256_set1_ps(static_cast<float>(nt)), _CMP_LT_OQ),
                             _mm256_cmp_ps(lanes, _mm256_set1_ps(static_cast<float>(nt - 8)), _CMP_LT_OQ)};
    for (int i = 0; i < G; ++i) {  // the block's scores, the new running maximum, weights, rescaled sums
      __m256 s[2];
      for (int h = 0; h < 2; ++h) s[h] = _mm256_blendv_ps(ninf, lane_sums8(cur[i] + 8 * h), valid[h]);
      const float best = std::max(m[i], hmax8(_mm256_max_ps(s[0], s[1])));
      __m256 sum = _mm256_setzero_ps();
      for (int h = 0; h < 2; ++h) {
        const __m256 w = _mm256_and_ps(exp8(_mm256_sub_ps(s[h], _mm256_set1_ps(best))), valid[h]);
        _mm256_store_ps(p[i] + 8 * h, w);
        sum = _mm256_add_ps(sum, w);
      }
      rescale[i] = exp_nonpositive(m[i] - best);  // ~0 on the first block (m = -inf)
      l[i] = l[i] * rescale[i] + hsum8(sum);
      m[i] = best;
    }
    if (b + 1 < blocks)
      block_scores<T, D, G>(qf, kp + table[b + 1] * k_block, std::min<int64_t>(16, len - (b + 1) * 16), k_token,
                            parts[(b + 1) & 1]);
    for (int c = 0; c < C; ++c) {  // the weighted values, 8 of the D output values at a time
      __m256 a[G], e[G];
      for (int i = 0; i < G; ++i) {
        a[i] = _mm256_mul_ps(_mm256_load_ps(acc[i] + c * 8), _mm256_set1_ps(rescale[i]));
        e[i] = _mm256_setzero_ps();
      }
      int64_t t = 0;
      for (; t + 2 <= nt; t += 2) {
        const __m256 v0 = load8(vb + t * k_token + c * 8), v1 = load8(vb + (t + 1) * k_token + c * 8);
        for (int i = 0; i < G; ++i) {
          a[i] = _mm256_fmadd_ps(_mm256_broadcast_ss(p[i] + t), v0, a[i]);
          e[i] = _mm256_fmadd_ps(_mm256_broadcast_ss(p[i] + t + 1), v1, e[i]);
        }
      }
      if (t < nt) {
        const __m256 v = load8(vb + t * k_token + c * 8);
        for (int i = 0; i < G; ++i) a[i] = _mm256_fmadd_ps(_mm256_broadcast_ss(p[i] + t), v, a[i]);
      }
      for (int i = 0; i < G; ++i) _mm256_store_ps(acc[i] + c * 8, _mm256_add_ps(a[i], e[i]));
    }
  }
  for (int i = 0; i < G; ++i) {  // a row with no key (never in practice) gives zeros
    const __m256 inv = _mm256_set1_ps(l[i] > 0.f ? 1.f / l[i] : 0.f);
    for (int c = 0; c < C; ++c)
      _mm256_storeu_ps(out + i * D + c * 8, _mm256_mul_ps(_mm256_load_ps(acc[i] + c * 8), inv));
  }
}

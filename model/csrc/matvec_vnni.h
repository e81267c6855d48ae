// The int8 matvec on AVX-512 VNNI: int8 weights times x quantized to int8 in blocks of 32 features, as llama.cpp's
// Q8_0 x Q8_0 product does, instead of widening every weight to bfloat16 (which made the int8 product bound by
// the widening instructions, not by memory: matvec.cpp's `linear`).
//
// Weight: the per-row int8 q of model/quantize.py plus 128, as uint8, packed per work item of 32 rows with each
// quad of input features side by side: packed[item][k / 4][row][4] (`vpdpbusd`'s unsigned operand: 16 rows x 4
// features per 64-byte load, the item's two 16-row panels one after the other, so an item is one forward stream).
// x: each row's blocks of 32 features quantized symmetrically, xq = round(x / s_b), s_b = max|x_b| / 127. One
// `vpdpbusd` adds, for 16 rows at once, four products (q + 128) * xq; a block's sum less 128 * sum(xq_b) is exactly
// sum(q * xq) in int32, which is scaled by s_b into float32 sums; y = sums * the row's scale (+ bias), or each
// block's sum by its own weight scale too (Q8_0's form). Included by matvec.cpp inside its anonymous namespace.
#pragma once

constexpr int64_t QBLOCK = 32;  // features per x scale

inline __m512 floats16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 floats16(const at::BFloat16* p) {
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}

// x (M, K) -> xq (M, K) int8, scale (M, K / 32) float32, and 128 * sum(xq) per block (M, K / 32) int32; a block of
// 32 in two registers, rounded to nearest even (std::nearbyint's rounding, vectorized: a scalar loop of it cost more
// than the product at 32 rows).
template <typename In>
void quantize_rows(const In* x, int64_t M, int64_t K, int8_t* xq, float* xs, int32_t* xc) {
  const int64_t nb = K / QBLOCK;
  at::parallel_for(0, M * nb, 256, [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      const int64_t m = j / nb, b = j % nb;
      const In* src = x + m * K + b * QBLOCK;
      const __m512 lo = floats16(src), hi = floats16(src + 16);
      const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(lo), _mm512_abs_ps(hi)));
      const __m512 inv = _mm512_set1_ps(amax > 0.f ? 127.f / amax : 0.f);
      const __m512i ql = _mm512_cvtps_epi32(_mm512_mul_ps(lo, inv)), qh = _mm512_cvtps_epi32(_mm512_mul_ps(hi, inv));
      int8_t* dst = xq + m * K + b * QBLOCK;
      _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), _mm512_cvtepi32_epi8(ql));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + 16), _mm512_cvtepi32_epi8(qh));
      xs[j] = amax / 127.f;
      xc[j] = 128 * _mm512_reduce_add_epi32(_mm512_add_epi32(ql, qh));
    }
  });
}

// sums[i][p]: 16 float32 outputs for x row m0 + i and panel p of the item at `w` (K4 quads per panel). ws: the
// item's float16 scales per block of 32 features, [block][32 rows] (llama.cpp's Q8_0: `linear_q8_blocks`), or null
// where the weight has one scale per row: a block's sums are then scaled by x's scale times its 16 rows' scales.
template <int R>
inline void tile_q8(const int32_t* xq, const float* xs, const int32_t* xc, int64_t K4, const uint8_t* w,
                    const uint16_t* ws, __m512 (&sums)[MT][NP]) {
  const int64_t nb = K4 / (QBLOCK / 4);
  __m512 acc[R][NP];
  for (int i = 0; i < R; ++i)
    for (int p = 0; p < NP; ++p) acc[i][p] = _mm512_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    __m512i dots[R][NP];
    for (int i = 0; i < R; ++i)
      for (int p = 0; p < NP; ++p) dots[i][p] = _mm512_setzero_si512();
    for (int64_t kq = b * (QBLOCK / 4); kq < (b + 1) * (QBLOCK / 4); ++kq) {
      __m512i wv[NP];
      for (int p = 0; p < NP; ++p) wv[p] = _mm512_loadu_si512(w + (kq * NP + p) * 4 * PANEL);
      for (int i = 0; i < R; ++i) {
        const __m512i xv = _mm512_set1_epi32(xq[i * K4 + kq]);
        for (int p = 0; p < NP; ++p) dots[i][p] = _mm512_dpbusd_epi32(dots[i][p], wv[p], xv);
      }
    }
    __m512 wsv[NP];
    if (ws != nullptr)
      for (int p = 0; p < NP; ++p)
        wsv[p] = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(ws + b * 32 + PANEL * p)));
    for (int i = 0; i < R; ++i) {
      const __m512i c = _mm512_set1_epi32(xc[i * nb + b]);
      const __m512 s = _mm512_set1_ps(xs[i * nb + b]);
      for (int p = 0; p < NP; ++p)
        acc[i][p] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(dots[i][p], c)),
                                    ws != nullptr ? _mm512_mul_ps(s, wsv[p]) : s, acc[i][p]);
    }
  }
  for (int i = 0; i < R; ++i)
    for (int p = 0; p < NP; ++p) sums[i][p] = acc[i][p];
}

// ws: float16 block scales (items, K / 32, 32), or null for one float32 scale per row (`scale`).
template <typename Out>
void run_q8(const int8_t* xq, const float* xs, const int32_t* xc, int64_t M, int64_t K, const uint8_t* w, int64_t N,
            const float* scale, const float* bias, Out* y, const uint16_t* ws = nullptr) {
  const int64_t K4 = K / 4, nb = K / QBLOCK;
  const auto* xq4 = reinterpret_cast<const int32_t*>(xq);
  const int64_t items = (N + NP * PANEL - 1) / (NP * PANEL);
  at::parallel_for(0, items, 1, [&](int64_t begin, int64_t end) {
    __m512 sums[MT][NP];
    for (int64_t item = begin; item < end; ++item) {
      const uint8_t* wi = w + item * NP * K4 * 4 * PANEL;
      const uint16_t* wsi = ws != nullptr ? ws + item * nb * NP * PANEL : nullptr;
      for (int64_t m0 = 0; m0 < M; m0 += 4) {
        const int64_t r = std::min<int64_t>(4, M - m0);
        const int32_t* xt = xq4 + m0 * K4;
        switch (r) {
          case 4: tile_q8<4>(xt, xs + m0 * nb, xc + m0 * nb, K4, wi, wsi, sums); break;
          case 3: tile_q8<3>(xt, xs + m0 * nb, xc + m0 * nb, K4, wi, wsi, sums); break;
          case 2: tile_q8<2>(xt, xs + m0 * nb, xc + m0 * nb, K4, wi, wsi, sums); break;
          default: tile_q8<1>(xt, xs + m0 * nb, xc + m0 * nb, K4, wi, wsi, sums); break;
        }
        store_rows(sums, r, m0, item, N, scale, bias, y);
      }
    }
  });
}

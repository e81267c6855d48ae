// The decode matvec on AVX2 + FMA (no AVX-512): the same packed layouts, the same entry points' semantics, in
// 8-lane registers. A 16-row panel is two ymm registers of float32 sums (rows 0-7, rows 8-15); a work item (two
// panels, 32 rows) four.
//
// bfloat16 pairs (packed[panel][k/2][row][2]): one 32-byte load holds 8 rows' (w[r][k], w[r][k+1]) as 32-bit
// lanes, w[r][k] in the low half. A bfloat16 is a float32's high half, so the lane shifted left by 16 is w[r][k]
// and the lane with its low half cleared is w[r][k+1], each exact in float32; x's pair (bfloat16, as the AVX-512
// path rounds it) is split the same way into two broadcasts, and two FMAs add both features' products (exact:
// bfloat16 x bfloat16 fits a float32) into the rows' sums, feature k then k+1. int8 weights in the same pair layout
// (16 bytes: 8 rows x 2) are sign-extended to 16 then 32 bits and converted to float32 (exact), then the same two
// FMAs; the row's scale at the end. So y is x rounded to bfloat16 times the weight, summed in float32 over k in
// order, as on AVX-512 (whose vdpbf16ps adds a pair's two products in its own order: the two paths may differ in
// the last bits of a sum, not in what they compute).
//
// float32 (packed[panel][k][row]): per feature two 32-byte loads per panel, one broadcast of x[k], one FMA each.
//
// Below 8 rows of x (decode's few streams) a tile is at most MT2 rows: R x 4 sums, 2R broadcasts of x and a pair
// of weights fit the 16 ymm registers at R = 2, and each thread multiplies its 32-row item with every tile of x in
// turn while the item is in cache. From 8 rows, matvec_avx2_rows.h's taller tiles over one panel at a time. Every
// output goes through the same operations whatever the rows of x, so batching does not change a row's result.
// Included by matvec.cpp inside its anonymous namespace where the compiler targets AVX2 and FMA but not AVX-512
// BF16.
#pragma once

constexpr int64_t MT2 = 2;        // rows of x per tile
constexpr int64_t SUB = 2 * NP;   // 8-row halves of panels per item: sums per row of x

// 8 rows x features (k, k+1) of the packed weight as two float32 registers: w[r][k] and w[r][k+1].
inline void load_pairs(const at::BFloat16* p, __m256& even, __m256& odd) {
  const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  even = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
  odd = _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32(static_cast<int>(0xFFFF0000u))));
}
inline void load_pairs(const int8_t* p, __m256& even, __m256& odd) {
  const __m256i v = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));  // int16 pairs
  even = _mm256_cvtepi32_ps(_mm256_srai_epi32(_mm256_slli_epi32(v, 16), 16));
  odd = _mm256_cvtepi32_ps(_mm256_srai_epi32(v, 16));
}

// sums[i][s] = 8 float32 outputs for x row i of the tile and half s of the item starting at `w` (K2 pairs per
// panel); x as bfloat16 pairs.
template <int R, typename W>
inline void tile(const uint32_t* x, int64_t K2, const W* w, __m256 (&sums)[MT2][SUB]) {
  const __m256i high = _mm256_set1_epi32(static_cast<int>(0xFFFF0000u));
  __m256 acc[R][SUB];
  for (int i = 0; i < R; ++i)
    for (int s = 0; s < SUB; ++s) acc[i][s] = _mm256_setzero_ps();
  for (int64_t kp = 0; kp < K2; ++kp) {
    __m256 x0[R], x1[R];
    for (int i = 0; i < R; ++i) {
      const __m256i xv = _mm256_set1_epi32(static_cast<int>(x[i * K2 + kp]));
      x0[i] = _mm256_castsi256_ps(_mm256_slli_epi32(xv, 16));
      x1[i] = _mm256_castsi256_ps(_mm256_and_si256(xv, high));
    }
    for (int s = 0; s < SUB; ++s) {
      __m256 even, odd;
      load_pairs(w + ((s / 2) * K2 + kp) * 2 * PANEL + (s % 2) * PANEL, even, odd);
      for (int i = 0; i < R; ++i) acc[i][s] = _mm256_fmadd_ps(odd, x1[i], _mm256_fmadd_ps(even, x0[i], acc[i][s]));
    }
  }
  for (int i = 0; i < R; ++i)
    for (int s = 0; s < SUB; ++s) sums[i][s] = acc[i][s];
}

// One row of y at a panel's 16 outputs from n0 (fewer where N ends) from their float32 sums lo (outputs 0-7) and hi
// (8-15): times the output's scale, plus its bias.
template <typename Out>
inline void store_panel(__m256 lo, __m256 hi, int64_t n0, int64_t N, const float* scale, const float* bias,
                        Out* y_row) {
  alignas(32) float out[PANEL];
  __m256 v[2] = {lo, hi};
  for (int64_t h = 0; h < 2; ++h) {
    if (scale != nullptr) v[h] = _mm256_mul_ps(v[h], _mm256_loadu_ps(scale + n0 + 8 * h));  // padded to panels
    if (bias != nullptr) v[h] = _mm256_add_ps(v[h], _mm256_loadu_ps(bias + n0 + 8 * h));
    _mm256_store_ps(out + 8 * h, v[h]);
  }
  const int64_t count = std::min(PANEL, N - n0);
  for (int64_t j = 0; j < count; ++j) y_row[n0 + j] = static_cast<Out>(out[j]);
}

// y rows m0 .. m0 + r of the item's 32 outputs from their float32 sums.
template <int T, typename Out>
inline void store_rows(const __m256 (&sums)[T][SUB], int64_t r, int64_t m0, int64_t item, int64_t N,
                       const float* scale, const float* bias, Out* y) {
  for (int64_t i = 0; i < r; ++i)
    for (int64_t p = 0; p < NP && (item * NP + p) * PANEL < N; ++p)
      store_panel(sums[i][2 * p], sums[i][2 * p + 1], (item * NP + p) * PANEL, N, scale, bias, y + (m0 + i) * N);
}

#include "matvec_avx2_rows.h"

template <typename W, typename Out>
void run(const uint32_t* x, int64_t M, int64_t K2, const W* w, int64_t N, const float* scale, const float* bias,
         Out* y) {
  if (M >= attnserve::SHARED_FROM_ROWS) return run_rows(x, M, K2, w, N, scale, bias, y);
  const int64_t items = (N + NP * PANEL - 1) / (NP * PANEL);
  attnserve::share_items(items, false, [&](const auto& take) {
    __m256 sums[MT2][SUB];
    for (int64_t item = take(); item < items; item = take()) {
      const W* wi = w + item * NP * K2 * 2 * PANEL;
      for (int64_t m0 = 0; m0 < M; m0 += MT2) {
        const int64_t r = std::min(MT2, M - m0);
        if (r == 2) tile<2>(x + m0 * K2, K2, wi, sums);
        else tile<1>(x + m0 * K2, K2, wi, sums);
        store_rows(sums, r, m0, item, N, scale, bias, y);
      }
    }
  });
}

// float32: sums[i][s] as above over a weight packed[panel][k][row].
template <int R>
inline void tile_f32(const float* x, int64_t K, const float* w, __m256 (&sums)[MT2][SUB]) {
  __m256 acc[R][SUB];
  for (int i = 0; i < R; ++i)
    for (int s = 0; s < SUB; ++s) acc[i][s] = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    __m256 xv[R];
    for (int i = 0; i < R; ++i) xv[i] = _mm256_broadcast_ss(x + i * K + k);
    for (int s = 0; s < SUB; ++s) {
      const __m256 wv = _mm256_loadu_ps(w + ((s / 2) * K + k) * PANEL + (s % 2) * 8);
      for (int i = 0; i < R; ++i) acc[i][s] = _mm256_fmadd_ps(wv, xv[i], acc[i][s]);
    }
  }
  for (int i = 0; i < R; ++i)
    for (int s = 0; s < SUB; ++s) sums[i][s] = acc[i][s];
}

inline void run_f32(const float* x, int64_t M, int64_t K, const float* w, int64_t N, const float* bias, float* y) {
  if (M >= attnserve::SHARED_FROM_ROWS) return run_f32_rows(x, M, K, w, N, bias, y);
  const int64_t items = (N + NP * PANEL - 1) / (NP * PANEL);
  attnserve::share_items(items, false, [&](const auto& take) {
    __m256 sums[MT2][SUB];
    for (int64_t item = take(); item < items; item = take()) {
      const float* wi = w + item * NP * K * PANEL;
      for (int64_t m0 = 0; m0 < M; m0 += MT2) {
        const int64_t r = std::min(MT2, M - m0);
        if (r == 2) tile_f32<2>(x + m0 * K, K, wi, sums);
        else tile_f32<1>(x + m0 * K, K, wi, sums);
        store_rows(sums, r, m0, item, N, nullptr, bias, y);
      }
    }
  });
}

// The float32 matvec: y = x W^T (+ bias) with float32 weights, products and sums, for a float32 model's decode
// step. oneDNN's prepacked GEMM read a float32 weight at ~15-25 GB/s at one row; this loop reads it once per call
// at the machine's rate, like the bfloat16 kernel.
//
// Weight packed in 16-row panels with the 16 rows' values of each input feature side by side:
// packed[panel][k][row] (one 64-byte load per feature and panel). x's value for feature k is broadcast and
// multiplied into 16 rows' float32 sums with one FMA; each thread takes 32 rows (two panels) at a time and up to
// 8 rows of x while they are in cache. Sums run over k in order, so a row's result does not depend on the other
// rows of x. This is the AVX-512 loop (16 rows a register); on AVX2 + FMA without AVX-512 BF16 matvec_avx2.h's
// `run_f32` does the same over the same layout, a panel in two 8-lane registers. Included by matvec.cpp inside its
// anonymous namespace.
#pragma once

template <int R>
inline void tile_f32(const float* x, int64_t K, const float* w, __m512 (&sums)[MT][NP]) {
  __m512 acc[R][NP];
  for (int i = 0; i < R; ++i)
    for (int p = 0; p < NP; ++p) acc[i][p] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    __m512 wv[NP];
    for (int p = 0; p < NP; ++p) wv[p] = _mm512_loadu_ps(w + (p * K + k) * PANEL);
    for (int i = 0; i < R; ++i) {
      const __m512 xv = _mm512_set1_ps(x[i * K + k]);
      for (int p = 0; p < NP; ++p) acc[i][p] = _mm512_fmadd_ps(wv[p], xv, acc[i][p]);
    }
  }
  for (int i = 0; i < R; ++i)
    for (int p = 0; p < NP; ++p) sums[i][p] = acc[i][p];
}

inline void run_f32(const float* x, int64_t M, int64_t K, const float* w, int64_t N, const float* bias, float* y) {
  const int64_t items = (N + NP * PANEL - 1) / (NP * PANEL);
  at::parallel_for(0, items, 1, [&](int64_t begin, int64_t end) {
    __m512 sums[MT][NP];
    for (int64_t item = begin; item < end; ++item) {
      const float* wi = w + item * NP * K * PANEL;
      for (int64_t m0 = 0; m0 < M; m0 += MT) {
        const int64_t r = std::min(MT, M - m0);
        const float* xt = x + m0 * K;
        switch (r) {
          case 8: tile_f32<8>(xt, K, wi, sums); break;
          case 7: tile_f32<7>(xt, K, wi, sums); break;
          case 6: tile_f32<6>(xt, K, wi, sums); break;
          case 5: tile_f32<5>(xt, K, wi, sums); break;
          case 4: tile_f32<4>(xt, K, wi, sums); break;
          case 3: tile_f32<3>(xt, K, wi, sums); break;
          case 2: tile_f32<2>(xt, K, wi, sums); break;
          default: tile_f32<1>(xt, K, wi, sums); break;
        }
        store_rows(sums, r, m0, item, N, nullptr, bias, y);
      }
    }
  });
}

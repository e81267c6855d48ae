// The AVX2 product at 8 rows of x or more (a batch of decode rows, a prefill chunk): GEMM's register blocking.
//
// The one-row tiles of matvec_avx2.h read each weight once per 2 rows of x and widen it again each time: at 32
// rows the loop re-reads a 32-row work item from L2 sixteen times and spends a shift or a mask per two FMAs on the
// bfloat16 pairs; SmolLM2's 32-row bfloat16 step ran its products at ~50 GMAC/s on 2 Zen 3 cores, half of what
// oneDNN's float32 GEMM reaches there. Here a thread takes one 16-row panel of its item at a time and runs taller
// tiles of x over it (BLIS's 6 x 16 kernel for Haswell has the shape): float32 weights in place, 6 rows of x (12
// ymm sums, the panel's two registers of feature k, one broadcast of x[r][k]: 12 FMAs per 2 loads of the weight);
// bfloat16 or int8 pairs widened in registers, 4 rows (8 sums, 4 widened weights, 2 broadcasts and the mask: 16
// FMAs per 2 loads and 4 shifts or masks). Measured on a 2-core Zen 3, alternated: a 32-row product ~15-30%
// faster, SmolLM2's 32-row bfloat16 step 70-78 ms against 84-88 ms. Widening a panel into a float32 buffer first
// was slower (the stores cost as much as the FMAs saved), and 5 or 6 rows of pairs spill registers (~25% slower).
//
// Every output is the same chain of FMAs as in the one-row tiles (from zero, feature 0, 1, ... in order; x and
// the weight widened exactly to float32), so a row's result does not depend on the rows beside it or on which
// path ran. Included by matvec_avx2.h inside matvec.cpp's anonymous namespace.
#pragma once

constexpr int64_t MB = 6;  // rows of x per tile of the batched path

// The rows of x of the tile at m0 when M rows go in tiles of at most `most`, as even as they can be: a tile of
// one or two rows keeps too few sums to cover the FMA's latency (8 rows as 6 + 2 ran slower than as 4 + 4).
inline int64_t tile_rows_at(int64_t M, int64_t m0, int64_t most) {
  const int64_t rest = M - m0, tiles = (rest + most - 1) / most;
  return (rest + tiles - 1) / tiles;
}

// sums[i][h]: rows 8h .. 8h + 7 of the panel wp (K, 16) for row i of the tile x (R rows, K float32 features each).
template <int R>
inline void tile_rows(const float* x, int64_t K, const float* wp, __m256 (&sums)[MB][2]) {
  __m256 acc[R][2];
  for (int i = 0; i < R; ++i) acc[i][0] = acc[i][1] = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    const __m256 w0 = _mm256_loadu_ps(wp + k * PANEL), w1 = _mm256_loadu_ps(wp + k * PANEL + 8);
    for (int i = 0; i < R; ++i) {
      const __m256 xv = _mm256_broadcast_ss(x + i * K + k);
      acc[i][0] = _mm256_fmadd_ps(w0, xv, acc[i][0]);
      acc[i][1] = _mm256_fmadd_ps(w1, xv, acc[i][1]);
    }
  }
  for (int i = 0; i < R; ++i) sums[i][0] = acc[i][0], sums[i][1] = acc[i][1];
}

// y's rows (M, N) at a panel's 16 outputs from n0: tiles of at most `most` rows of x, tile.template
// operator()<R>(m0, sums) computing each, then each sum times the output's scale, plus its bias, stored.
template <typename Out, typename Tile>
inline void panel_rows(int64_t M, int64_t most, int64_t n0, int64_t N, const float* scale, const float* bias, Out* y,
                       const Tile& tile) {
  __m256 sums[MB][2];
  for (int64_t m0 = 0, r; m0 < M; m0 += r) {
    r = tile_rows_at(M, m0, most);
    switch (r) {
      case 6: tile.template operator()<6>(m0, sums); break;
      case 5: tile.template operator()<5>(m0, sums); break;
      case 4: tile.template operator()<4>(m0, sums); break;
      case 3: tile.template operator()<3>(m0, sums); break;
      case 2: tile.template operator()<2>(m0, sums); break;
      default: tile.template operator()<1>(m0, sums);
    }
    for (int64_t i = 0; i < r; ++i) store_panel(sums[i][0], sums[i][1], n0, N, scale, bias, y + (m0 + i) * N);
  }
}

// sums[i][h] as tile_rows, over a panel of bfloat16 or int8 pairs wp (K2, 16, 2) widened in registers: per pair of
// features two loads and four shifts or masks (load_pairs) serve R rows' 4 FMAs each, where the one-row tiles
// widened for every 2 rows; R = 4 keeps 8 sums, 4 widened weights, 2 broadcasts and the mask in registers.
template <int R, typename W>
inline void tile_pairs(const float* x, int64_t K2, const W* wp, __m256 (&sums)[MB][2]) {
  __m256 acc[R][2];
  for (int i = 0; i < R; ++i) acc[i][0] = acc[i][1] = _mm256_setzero_ps();
  const int64_t K = 2 * K2;
  for (int64_t kp = 0; kp < K2; ++kp) {
    __m256 e0, o0, e1, o1;
    load_pairs(wp + kp * 2 * PANEL, e0, o0);
    load_pairs(wp + kp * 2 * PANEL + PANEL, e1, o1);
    for (int i = 0; i < R; ++i) {
      const __m256 xe = _mm256_broadcast_ss(x + i * K + 2 * kp), xo = _mm256_broadcast_ss(x + i * K + 2 * kp + 1);
      acc[i][0] = _mm256_fmadd_ps(o0, xo, _mm256_fmadd_ps(e0, xe, acc[i][0]));
      acc[i][1] = _mm256_fmadd_ps(o1, xo, _mm256_fmadd_ps(e1, xe, acc[i][1]));
    }
  }
  for (int i = 0; i < R; ++i) sums[i][0] = acc[i][0], sums[i][1] = acc[i][1];
}

// run()'s product at M >= 8 rows: x as bfloat16 pairs (M, K2) widened once to float32 (M, 2 K2), then tiles of up
// to 4 rows over each panel of the thread's items.
template <typename W, typename Out>
void run_rows(const uint32_t* x, int64_t M, int64_t K2, const W* w, int64_t N, const float* scale,
              const float* bias, Out* y) {
  const int64_t K = 2 * K2, items = (N + NP * PANEL - 1) / (NP * PANEL);
  std::vector<float> xf(M * K);
  for (int64_t j = 0; j < M * K2; ++j) {
    xf[2 * j] = std::bit_cast<float>(x[j] << 16);
    xf[2 * j + 1] = std::bit_cast<float>(x[j] & 0xFFFF0000u);
  }
  attnserve::share_items(items, true, [&](const auto& take) {
    for (int64_t item = take(); item < items; item = take())
      for (int64_t p = 0; p < NP && (item * NP + p) * PANEL < N; ++p) {
        const W* wp = w + (item * NP + p) * K2 * 2 * PANEL;
        panel_rows(M, 4, (item * NP + p) * PANEL, N, scale, bias, y, [&]<int R>(int64_t m0, auto& sums) {
          tile_pairs<R>(xf.data() + m0 * K, K2, wp, sums);
        });
      }
  });
}

// run_f32()'s product at M >= 8 rows: the packed float32 panels read in place, tiles of up to 6 rows.
inline void run_f32_rows(const float* x, int64_t M, int64_t K, const float* w, int64_t N, const float* bias,
                         float* y) {
  const int64_t items = (N + NP * PANEL - 1) / (NP * PANEL);
  attnserve::share_items(items, true, [&](const auto& take) {
    for (int64_t item = take(); item < items; item = take())
      for (int64_t p = 0; p < NP && (item * NP + p) * PANEL < N; ++p) {
        const float* wp = w + (item * NP + p) * K * PANEL;
        panel_rows(M, MB, (item * NP + p) * PANEL, N, nullptr, bias, y, [&]<int R>(int64_t m0, auto& sums) {
          tile_rows<R>(x + m0 * K, K, wp, sums);
        });
      }
  });
}

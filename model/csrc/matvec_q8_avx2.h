// The int8 x int8 matvec on AVX2 (no VNNI): the same weight layout and the same quantized x as matvec_vnni.h, so
// the int32 sums of a block are exactly those of the VNNI build, and only their float32 accumulation may differ in
// a last bit. Widening every int8 weight to float32 (matvec_avx2.h's `linear`) cost ~6 instructions per 16 weights,
// redone for every 2 rows of x: the int8 step was bound by the widening, not by memory.
//
// AVX2's int8 product is vpmaddubsw (unsigned x signed bytes, adjacent pairs summed into saturating int16), then
// vpmaddwd by ones (pairs of int16 into int32). Its unsigned operand here is |xq| (at most 127), taken once per
// broadcast of x, and its signed one the weight q with xq's sign applied (vpsignb; zero where xq is zero), so each
// product is q * xq and a pair sum is at most 2 * 127 * 127 = 32258: nothing saturates. The weight is packed as q
// itself in this build (pack_quads; q + 128, VNNI's unsigned operand, elsewhere), clamped to +-127 so that its sign
// can flip: the loop is one load, then per row of x vpsignb, vpmaddubsw, vpmaddwd and an add per 32 products.
// (llama.cpp's AVX2 Q8_0 product takes |q| per load and signs x by q: two more instructions per load, and with
// the q + 128 form a third to flip it back; this order measured 5-10% faster at 1 and 32 rows on a 2-core Zen 3.)
//
// One 32-byte load is 8 rows x 4 features; a block of 32 features is 8 loads per 8 rows; per block, each row of x
// and each 8 rows of weight add one int32 register of sums, converted and scaled by the block's x scale into
// float32 sums. Included by matvec.cpp inside its anonymous namespace after matvec_avx2.h.
//
// A weight may also carry a scale per block of 32 features of each row (llama.cpp's Q8_0: `linear_q8_blocks`),
// float16, laid out per item as [block][32 rows]: the block's int32 sums are then scaled by x's scale times the
// 8 rows' weight scales (one 16-byte load and conversion per 8 rows and block, shared by the tile's rows) and the
// outputs by nothing more.
#pragma once

constexpr int64_t QBLOCK = 32;  // features per x scale
constexpr int64_t MQ = 2;       // rows of x per tile

#include "avx2_lanes.h"

inline int32_t hsum(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  return _mm_cvtsi128_si32(_mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1)));
}

// x (M, K) -> xq (M, K) int8, scale (M, K / 32) float32 and 128 * sum(xq) per block (M, K / 32), as the VNNI build
// computes them (rounded to nearest even; the last output is unused here but kept for one interface).
template <typename In>
void quantize_rows(const In* x, int64_t M, int64_t K, int8_t* xq, float* xs, int32_t* xc) {
  const int64_t nb = K / QBLOCK;
  const __m256 sign = _mm256_set1_ps(-0.f);
  at::parallel_for(0, M * nb, 256, [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      const int64_t m = j / nb, b = j % nb;
      const In* src = x + m * K + b * QBLOCK;
      __m256 v[4];
      for (int h = 0; h < 4; ++h) v[h] = load8(src + 8 * h);
      const __m256 a = _mm256_max_ps(_mm256_max_ps(_mm256_andnot_ps(sign, v[0]), _mm256_andnot_ps(sign, v[1])),
                                     _mm256_max_ps(_mm256_andnot_ps(sign, v[2]), _mm256_andnot_ps(sign, v[3])));
      const float amax = hmax8(a);
      const __m256 inv = _mm256_set1_ps(amax > 0.f ? 127.f / amax : 0.f);
      __m256i q[4];
      for (int h = 0; h < 4; ++h) q[h] = _mm256_cvtps_epi32(_mm256_mul_ps(v[h], inv));
      // int32 -> int8 in order: the packs interleave 128-bit lanes, the permute puts them back
      const __m256i w16 = _mm256_packs_epi32(q[0], q[1]), w16b = _mm256_packs_epi32(q[2], q[3]);
      const __m256i b8 = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(w16, w16b),
                                                     _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(xq + m * K + b * QBLOCK), b8);
      xs[j] = amax / 127.f;
      xc[j] = 128 * hsum(_mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3])));
    }
  });
}

// sums[i][s]: 8 float32 outputs for x row i of the tile and 8-row group s of the item at `w` (K4 quads).
// A tile is at most MQ = 2 rows of x: 8 int32 sums, the rows' broadcasts with their absolute values and a weight fit
// the 16 registers (the float32 sums, touched once a block, may live in memory). Tiles of 4 rows over one 8-row
// group at a time measured 5-10% slower at 8 and 32 rows on a 2-core Zen 3, where the loop is bound by the
// integer multiplies (two per 32 products).
// ws: the item's float16 block scales, [block][32 rows], or null where the weight has one scale per row.
template <int R>
inline void tile_q8(const int32_t* xq, const float* xs, int64_t K4, const uint8_t* w, const uint16_t* ws,
                    __m256 (&sums)[MQ][SUB]) {
  const int64_t nb = K4 / (QBLOCK / 4);
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 acc[R][SUB];
  for (int i = 0; i < R; ++i)
    for (int s = 0; s < SUB; ++s) acc[i][s] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    __m256i dots[R][SUB];
    for (int i = 0; i < R; ++i)
      for (int s = 0; s < SUB; ++s) dots[i][s] = _mm256_setzero_si256();
    for (int64_t kq = b * (QBLOCK / 4); kq < (b + 1) * (QBLOCK / 4); ++kq) {
      __m256i xv[R], xa[R];
      for (int i = 0; i < R; ++i) {
        xv[i] = _mm256_set1_epi32(xq[i * K4 + kq]);
        xa[i] = _mm256_abs_epi8(xv[i]);
      }
      for (int s = 0; s < SUB; ++s) {
        const __m256i q =
            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + (kq * NP * PANEL + 8 * s) * 4));
        for (int i = 0; i < R; ++i) {
          const __m256i pairs = _mm256_maddubs_epi16(xa[i], _mm256_sign_epi8(q, xv[i]));
          dots[i][s] = _mm256_add_epi32(dots[i][s], _mm256_madd_epi16(pairs, ones));
        }
      }
    }
    __m256 wsv[SUB];
    if (ws != nullptr)
      for (int s = 0; s < SUB; ++s)
        wsv[s] = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(ws + b * 32 + 8 * s)));
    for (int i = 0; i < R; ++i) {
      const __m256 sc = _mm256_set1_ps(xs[i * nb + b]);
      for (int s = 0; s < SUB; ++s)
        acc[i][s] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dots[i][s]), ws != nullptr ? _mm256_mul_ps(sc, wsv[s]) : sc,
                                    acc[i][s]);
    }
  }
  for (int i = 0; i < R; ++i)
    for (int s = 0; s < SUB; ++s) sums[i][s] = acc[i][s];
}

// ws: float16 block scales (items, K / 32, 32), or null for one float32 scale per row (`scale`).
template <typename Out>
void run_q8(const int8_t* xq, const float* xs, const int32_t*, int64_t M, int64_t K, const uint8_t* w, int64_t N,
            const float* scale, const float* bias, Out* y, const uint16_t* ws = nullptr) {
  const int64_t K4 = K / 4, nb = K / QBLOCK;
  const auto* xq4 = reinterpret_cast<const int32_t*>(xq);
  const int64_t items = (N + NP * PANEL - 1) / (NP * PANEL);
  attnserve::share_items(items, M >= attnserve::SHARED_FROM_ROWS, [&](const auto& take) {
    __m256 sums[MQ][SUB];
    for (int64_t item = take(); item < items; item = take()) {
      const uint8_t* wi = w + item * NP * K4 * 4 * PANEL;
      const uint16_t* wsi = ws != nullptr ? ws + item * nb * NP * PANEL : nullptr;
      for (int64_t m0 = 0; m0 < M; m0 += MQ) {
        const int64_t r = std::min(MQ, M - m0);
        const int32_t* xt = xq4 + m0 * K4;
        if (r == 2) tile_q8<2>(xt, xs + m0 * nb, K4, wi, wsi, sums);
        else tile_q8<1>(xt, xs + m0 * nb, K4, wi, wsi, sums);
        store_rows(sums, r, m0, item, N, scale, bias, y);
      }
    }
  });
}

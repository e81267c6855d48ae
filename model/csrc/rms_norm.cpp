// RMSNorm over the last dimension, y = x / sqrt(mean(x^2) + eps) * g, for a decode step's few rows in one pass.
//
// torch's own (aten::rms_norm) runs as ~10 small ops on a CPU (cast up, square, mean, add, rsqrt, multiply, cast
// down): ~15 us for one bfloat16 row of 576, against ~1 us of arithmetic; a 30-layer step calls it 61 times.
// Same arithmetic as torch's for bfloat16 and float32 input: the sum of squares and the scaling in float32, the
// result rounded once to x's dtype after multiplying by g (g in x's dtype, as nn.RMSNorm's weight is).
// A bfloat16 row whose length is a multiple of 16 (or 8) runs in registers: AVX-512 BF16, or AVX2 + FMA (rounded to
// bfloat16 on the bits, nearest even, as c10 rounds); other rows in the portable loop.
#include "kernels.h"
#include <ATen/Parallel.h>

#if defined(__AVX512BF16__)
#include <immintrin.h>
#elif defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define ATTNSERVE_NORM_AVX2 1
#endif

#include <cmath>
#include <cstdint>
#include <type_traits>

namespace {

#if defined(__AVX512BF16__)
inline __m512 load16(const at::BFloat16* p) {
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}

// One bfloat16 row, 16 lanes at a time (the compiler does not vectorize at::BFloat16's conversions); the rest
// of the row, and every other case, in the portable loop below.
inline int64_t norm_row16(const at::BFloat16* xr, const at::BFloat16* g, at::BFloat16* yr, int64_t d, float eps) {
  int64_t n = d - d % 16;
  if (n != d) return 0;
  __m512 acc = _mm512_setzero_ps();
  for (int64_t i = 0; i < n; i += 16) {
    const __m512 v = load16(xr + i);
    acc = _mm512_fmadd_ps(v, v, acc);
  }
  const __m512 inv = _mm512_set1_ps(1.f / std::sqrt(_mm512_reduce_add_ps(acc) / static_cast<float>(d) + eps));
  for (int64_t i = 0; i < n; i += 16) {
    const __m512 v = _mm512_mul_ps(_mm512_mul_ps(load16(xr + i), inv), load16(g + i));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(yr + i), (__m256i)_mm512_cvtneps_pbh(v));
  }
  return n;
}
#elif defined(ATTNSERVE_NORM_AVX2)
inline __m256 load8(const at::BFloat16* p) {
  const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
}

// 8 float32 lanes rounded to bfloat16, nearest even (a NaN stays one), stored as 8 bfloat16.
inline void store8(at::BFloat16* p, __m256 v) {
  const __m256i u = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7fff)), lsb), 16);
  const __m256i nan = _mm256_cmpgt_epi32(_mm256_and_si256(u, _mm256_set1_epi32(0x7fffffff)),
                                         _mm256_set1_epi32(0x7f800000));
  r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7fc0), nan);
  const __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), packed);
}

// One bfloat16 row, 8 lanes at a time, where its length is a multiple of 8 (else 0: the portable loop).
inline int64_t norm_row8(const at::BFloat16* xr, const at::BFloat16* g, at::BFloat16* yr, int64_t d, float eps) {
  if (d % 8 != 0) return 0;
  __m256 acc = _mm256_setzero_ps();
  for (int64_t i = 0; i < d; i += 8) {
    const __m256 v = load8(xr + i);
    acc = _mm256_fmadd_ps(v, v, acc);
  }
  const __m128 q = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
  const __m128 h = _mm_add_ps(q, _mm_movehl_ps(q, q));
  const float sum = _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h)));
  const __m256 inv = _mm256_set1_ps(1.f / std::sqrt(sum / static_cast<float>(d) + eps));
  for (int64_t i = 0; i < d; i += 8) store8(yr + i, _mm256_mul_ps(_mm256_mul_ps(load8(xr + i), inv), load8(g + i)));
  return d;
}
#endif

template <typename T>
void norm_rows(const T* x, const T* g, T* y, int64_t rows, int64_t d, float eps) {
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* xr = x + r * d;
#if defined(__AVX512BF16__)
      if constexpr (std::is_same_v<T, at::BFloat16>) {
        if (norm_row16(xr, g, y + r * d, d, eps) == d) continue;
      }
#elif defined(ATTNSERVE_NORM_AVX2)
      if constexpr (std::is_same_v<T, at::BFloat16>) {
        if (norm_row8(xr, g, y + r * d, d, eps) == d) continue;
      }
#endif
      float sum = 0.f;
#pragma omp simd reduction(+ : sum)
      for (int64_t i = 0; i < d; ++i) sum += static_cast<float>(xr[i]) * static_cast<float>(xr[i]);
      const float inv = 1.f / std::sqrt(sum / static_cast<float>(d) + eps);
      T* yr = y + r * d;
#pragma omp simd
      for (int64_t i = 0; i < d; ++i) {
        yr[i] = static_cast<T>(static_cast<float>(xr[i]) * inv * static_cast<float>(g[i]));
      }
    }
  });
}

}  // namespace

namespace attnserve {

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& g, double eps) {
  TORCH_CHECK(x.scalar_type() == g.scalar_type(), "x and g: one dtype");
  TORCH_CHECK(g.dim() == 1 && x.size(-1) == g.size(0), "g must have x's last dimension");
  const at::Tensor xc = x.contiguous();
  auto y = at::empty_like(xc);
  const int64_t d = g.size(0), rows = d ? xc.numel() / d : 0;
  if (x.scalar_type() == at::kFloat) {
    norm_rows(xc.data_ptr<float>(), g.contiguous().data_ptr<float>(), y.data_ptr<float>(), rows, d, eps);
  } else if (x.scalar_type() == at::kBFloat16) {
    norm_rows(xc.data_ptr<at::BFloat16>(), g.contiguous().data_ptr<at::BFloat16>(), y.data_ptr<at::BFloat16>(),
              rows, d, eps);
  } else {
    TORCH_CHECK(false, "rms_norm: float32 or bfloat16 only");
  }
  return y;
}

}  // namespace attnserve

#if !defined(ATTNSERVE_NO_BINDINGS)
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("rms_norm", &attnserve::rms_norm, "RMSNorm over the last dimension (CPU)");
}
#endif

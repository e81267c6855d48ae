// Helpers shared by the AVX2 paths of the matvec (matvec_q8_avx2.h) and paged-attention (paged_attention.cpp)
// kernels: 8 lanes from float32 or bfloat16 storage as float32 (bfloat16 is the high half of a float32's bits),
// and the largest of 8 lanes. Each source includes it inside its own anonymous namespace.
#pragma once

inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const at::BFloat16* p) {
  const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
}

inline float hmax8(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  return _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
}

// Element-wise arithmetic for the CPU kernels, in forms the compiler vectorizes: bfloat16 <-> float32 on raw
// bits, e^x for x <= 0 as a polynomial (the softmax's and the activations'), and the FFN's activations over a row.
#pragma once
#include <torch/extension.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>

namespace attnserve::elementwise {

using bf16 = at::BFloat16;

// bfloat16 <-> float32 on raw bits, in a form the compiler vectorizes (c10's conversions are not): bfloat16 is a
// float32's high half; rounding to nearest, ties to even, as c10 does (NaN stays a NaN).
inline float f32(uint16_t b) { return std::bit_cast<float>(static_cast<uint32_t>(b) << 16); }
inline uint16_t to_bf16(float f) {
  const uint32_t u = std::bit_cast<uint32_t>(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
  return static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

// An element of the activations: bfloat16 (stored as its bits, rounded where torch rounds) or float32 (as is).
template <typename T>
struct Elem {
  using S = uint16_t;
  static float get(uint16_t b) { return f32(b); }
  static uint16_t put(float f) { return to_bf16(f); }
};
template <>
struct Elem<float> {
  using S = float;
  static float get(float f) { return f; }
  static float put(float f) { return f; }
};
template <typename T>
const typename Elem<T>::S* in(const at::Tensor& t) {
  return reinterpret_cast<const typename Elem<T>::S*>(t.data_ptr<T>());
}
template <typename T>
typename Elem<T>::S* out(at::Tensor& t) { return reinterpret_cast<typename Elem<T>::S*>(t.data_ptr<T>()); }

// e^x for x <= 0 (Cephes' exp2f polynomial, relative error ~2e-7), as paged_attention.cpp's softmax does.
inline float exp_nonpositive(float x) {
  const float y = std::max(x, -87.f) * 1.44269504088896341f;
  const float n = std::floor(y + 0.5f);
  const float f = y - n;
  float p = 1.535336188319500e-4f;
  p = p * f + 1.339887440266574e-3f;
  p = p * f + 9.618437357674640e-3f;
  p = p * f + 5.550332471162809e-2f;
  p = p * f + 2.402264791363012e-1f;
  p = p * f + 6.931472028550421e-1f;
  p = p * f + 1.f;
  return p * std::bit_cast<float>((static_cast<int32_t>(n) + 127) << 23);
}

// The FFN's activations, in forms the compiler vectorizes (model/layers.py's ACTIVATIONS, same order).
enum Activation : int64_t { SILU = 0, RELU = 1, GELU = 2, GELU_TANH = 3 };

// silu(x) = x sigmoid(x), with e = e^-|x| <= 1: sigmoid is 1 / (1 + e) for x >= 0 and e / (1 + e) below.
inline float silu(float x) {
  const float e = exp_nonpositive(-std::fabs(x));
  return x * (x >= 0.f ? 1.f : e) / (1.f + e);
}

// tanh(y) = sign(y) (1 - e) / (1 + e), e = e^-2|y|.
inline float tanh_(float y) {
  const float e = exp_nonpositive(-2.f * std::fabs(y));
  return std::copysign((1.f - e) / (1.f + e), y);
}

// erf(z) by Abramowitz and Stegun 7.1.26 (absolute error <= 1.5e-7).
inline float erf_(float z) {
  const float a = std::fabs(z), t = 1.f / (1.f + 0.3275911f * a);
  const float p =
      t * (0.254829592f + t * (-0.284496736f + t * (1.421413741f + t * (-1.453152027f + t * 1.061405429f))));
  return std::copysign(1.f - p * exp_nonpositive(-a * a), z);
}

template <int64_t Kind>
inline float activate(float x) {
  if constexpr (Kind == SILU) return silu(x);
  else if constexpr (Kind == RELU) return x > 0.f ? x : 0.f;
  else if constexpr (Kind == GELU) return 0.5f * x * (1.f + erf_(x * 0.70710678118654752f));
  else return 0.5f * x * (1.f + tanh_(0.79788456080286536f * (x + 0.044715f * x * x * x)));
}

// One row of the FFN's hidden layer: gated, act(gate) * up with act's output rounded before the product as torch's
// ops do; else act(x).
template <int64_t Kind, typename T, typename S = typename Elem<T>::S>
void activate_row(const S* h, int64_t F, bool gated, S* o) {
  using E = Elem<T>;
  if (gated) {
    const S* u = h + F;
#pragma omp simd
    for (int64_t i = 0; i < F; ++i) o[i] = E::put(E::get(E::put(activate<Kind>(E::get(h[i])))) * E::get(u[i]));
  } else {
#pragma omp simd
    for (int64_t i = 0; i < F; ++i) o[i] = E::put(activate<Kind>(E::get(h[i])));
  }
}

}  // namespace attnserve::elementwise

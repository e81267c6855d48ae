// Row-wise steps of the fused decoder step (decoder_step.cpp) that are not kernels of their own: LayerNorm, the
// residual sum, the embedding lookup, the greedy argmax. Each rounds to the activations' dtype where torch's op
// rounds.
#pragma once
#include "elementwise.h"
#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>
#include <cstring>

namespace attnserve::rows {

using namespace attnserve::elementwise;

// LayerNorm of each row: (x - mean) / sqrt(var + eps) * g (+ b), in float32, rounded once.
template <typename T>
at::Tensor layer_norm(const at::Tensor& x, const at::Tensor& g, const c10::optional<at::Tensor>& b, double eps) {
  using E = Elem<T>;
  using S = typename E::S;
  const int64_t N = x.size(0), d = x.size(1);
  at::Tensor y = at::empty_like(x);
  const S *xp = in<T>(x), *gp = in<T>(g), *bp = b.has_value() ? in<T>(*b) : nullptr;
  S* yp = out<T>(y);
  for (int64_t n = 0; n < N; ++n) {
    const S* xr = xp + n * d;
    float sum = 0.f, sq = 0.f;
#pragma omp simd reduction(+ : sum)
    for (int64_t i = 0; i < d; ++i) sum += E::get(xr[i]);
    const float mean = sum / d;
#pragma omp simd reduction(+ : sq)
    for (int64_t i = 0; i < d; ++i) sq += (E::get(xr[i]) - mean) * (E::get(xr[i]) - mean);
    const float rstd = 1.f / std::sqrt(sq / d + static_cast<float>(eps));
    S* yr = yp + n * d;
#pragma omp simd
    for (int64_t i = 0; i < d; ++i)
      yr[i] = E::put((E::get(xr[i]) - mean) * rstd * E::get(gp[i]) + (bp ? E::get(bp[i]) : 0.f));
  }
  return y;
}

// x += y, rounded to x's dtype (the eager step's residual sum).
template <typename T>
void add_into(at::Tensor& x, const at::Tensor& y) {
  using E = Elem<T>;
  typename E::S* xp = out<T>(x);
  const typename E::S* yp = in<T>(y);
  const int64_t n = x.numel();
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) xp[i] = E::put(E::get(xp[i]) + E::get(yp[i]));
}

// x[n] = embed[token] (* scale) (+ added[position] where `added` is defined), each op rounded to T.
template <typename T>
void embed_rows(const at::Tensor& embed, double embed_scale, const at::Tensor& added, const int64_t* tokens,
                const int64_t* positions, int64_t N, at::Tensor& x) {
  using E = Elem<T>;
  const int64_t D = embed.size(1);
  const auto *ep = in<T>(embed), *ap = added.numel() ? in<T>(added) : nullptr;
  auto* xp = out<T>(x);
  const float scale = static_cast<float>(embed_scale);
  for (int64_t n = 0; n < N; ++n) {
    const auto* er = ep + tokens[n] * D;
    auto* xr = xp + n * D;
    if (scale != 1.f) {
#pragma omp simd
      for (int64_t i = 0; i < D; ++i) xr[i] = E::put(E::get(er[i]) * scale);
    } else {
      std::memcpy(xr, er, D * sizeof(*xr));
    }
    if (ap != nullptr) {
      const auto* ar = ap + positions[n] * D;
#pragma omp simd
      for (int64_t i = 0; i < D; ++i) xr[i] = E::put(E::get(xr[i]) + E::get(ar[i]));
    }
  }
}

// Each row's greedy choice over float32 logits (R, V): (R, 2) float32 of [the first index of the row's largest
// value, 1 where that value is not finite (a NaN anywhere, +-inf) else 0]: torch's max(-1) and ~isfinite in one
// pass, without the interpreter between their ops.
inline at::Tensor greedy(const at::Tensor& logits) {
  TORCH_CHECK(logits.dim() == 2 && logits.scalar_type() == at::kFloat && logits.size(1) > 0, "logits: (R, V) float32");
  const at::Tensor x = logits.contiguous();
  const int64_t R = x.size(0), V = x.size(1);
  at::Tensor result = at::empty({R, 2}, x.options());
  const float* xp = x.data_ptr<float>();
  float* rp = result.data_ptr<float>();
  at::parallel_for(0, R, 4, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* row = xp + r * V;
      float best = row[0];
      int64_t at = 0;
      bool nan = false;
      for (int64_t i = 0; i < V; ++i) {
        nan |= std::isnan(row[i]);
        if (row[i] > best) best = row[i], at = i;
      }
      rp[2 * r] = static_cast<float>(at);
      rp[2 * r + 1] = nan || !std::isfinite(best) ? 1.f : 0.f;
    }
  });
  return result;
}

}  // namespace attnserve::rows

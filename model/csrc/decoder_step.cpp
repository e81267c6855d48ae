// A pre-norm decoder stack's step in one call: for each layer, the norm, Q/K/V, rotary positions (where the model
// has them), the K/V write into the paged pool, paged attention, W_O and the residual, the norm, the FFN (gate/up
// and silu(gate) * up, or W_1 and GELU), W_2 and the residual, with no Python between them.
//
// The eager step runs the same layer as ~35 torch ops and module calls from Python: at one stream SmolLM2's 30
// layers spent ~9 ms a step there against ~8 ms in their matrix-vector products. Here the products, RMSNorm and the
// attention are the same kernels (kernels.h: matvec.cpp, paged_attention.cpp, rms_norm.cpp, linked into this
// module) and the small element-wise steps are loops over a row. Each step rounds to bfloat16 where the eager
// step's torch op does (q * cos, rotate_half(q) * sin and their sum; act(gate), its product with up; each
// residual sum), so the two agree to the last bit but where an activation's exp or erf (polynomials here, Sleef's
// in torch) or LayerNorm's sums (another order) land on the other side of a bfloat16 rounding: one value in
// hundreds or thousands, by one unit of its last place.
//
// Activations and the pool are bfloat16; the weights are packed once (model/cpu_linear.py) and bound to a
// `DecoderStep` object at load time, so a step passes only its activations and its block tables.
#include "kernels.h"
#include <ATen/Parallel.h>

#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

using bf16 = at::BFloat16;

// bfloat16 <-> float32 on raw bits, in a form the compiler vectorizes (c10's conversions are not): bfloat16 is a
// float32's high half; rounding to nearest, ties to even, as c10 does (NaN stays a NaN).
inline float f32(uint16_t b) { return std::bit_cast<float>(static_cast<uint32_t>(b) << 16); }
inline uint16_t to_bf16(float f) {
  const uint32_t u = std::bit_cast<uint32_t>(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
  return static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}
inline const uint16_t* bits(const at::Tensor& t) { return reinterpret_cast<const uint16_t*>(t.data_ptr<bf16>()); }
inline uint16_t* bits_mut(at::Tensor& t) { return reinterpret_cast<uint16_t*>(t.data_ptr<bf16>()); }

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
  const float p = t * (0.254829592f + t * (-0.284496736f + t * (1.421413741f + t * (-1.453152027f + t * 1.061405429f))));
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
template <int64_t Kind>
void activate_row(const uint16_t* h, int64_t F, bool gated, uint16_t* o) {
  if (gated) {
    const uint16_t* u = h + F;
#pragma omp simd
    for (int64_t i = 0; i < F; ++i) o[i] = to_bf16(f32(to_bf16(activate<Kind>(f32(h[i])))) * f32(u[i]));
  } else {
#pragma omp simd
    for (int64_t i = 0; i < F; ++i) o[i] = to_bf16(activate<Kind>(f32(h[i])));
  }
}

// A linear packed by model/cpu_linear.py: bfloat16, int8 widened in registers, or int8 on VNNI.
struct Linear {
  at::Tensor packed;
  int64_t n;
  c10::optional<at::Tensor> scale, bias;
  bool vnni;
  at::Tensor operator()(const at::Tensor& x) const {
    return vnni ? attnserve::linear_q8(x, packed, n, *scale, bias) : attnserve::linear(x, packed, n, scale, bias);
  }
};

c10::optional<at::Tensor> given(const at::Tensor& t) { return t.defined() && t.numel() ? c10::optional(t) : c10::nullopt; }

// LayerNorm of each row: (x - mean) / sqrt(var + eps) * g (+ b), in float32, rounded once.
at::Tensor layer_norm(const at::Tensor& x, const at::Tensor& g, const c10::optional<at::Tensor>& b, double eps) {
  const int64_t N = x.size(0), d = x.size(1);
  at::Tensor y = at::empty_like(x);
  const uint16_t *xp = bits(x), *gp = bits(g), *bp = b.has_value() ? bits(*b) : nullptr;
  uint16_t* yp = bits_mut(y);
  for (int64_t n = 0; n < N; ++n) {
    const uint16_t* xr = xp + n * d;
    float sum = 0.f, sq = 0.f;
#pragma omp simd reduction(+ : sum)
    for (int64_t i = 0; i < d; ++i) sum += f32(xr[i]);
    const float mean = sum / d;
#pragma omp simd reduction(+ : sq)
    for (int64_t i = 0; i < d; ++i) sq += (f32(xr[i]) - mean) * (f32(xr[i]) - mean);
    const float rstd = 1.f / std::sqrt(sq / d + static_cast<float>(eps));
    uint16_t* yr = yp + n * d;
#pragma omp simd
    for (int64_t i = 0; i < d; ++i)
      yr[i] = to_bf16((f32(xr[i]) - mean) * rstd * f32(gp[i]) + (bp ? f32(bp[i]) : 0.f));
  }
  return y;
}

// x += y, rounded to bfloat16 (the eager step's residual sum).
void add_into(at::Tensor& x, const at::Tensor& y) {
  uint16_t* xp = bits_mut(x);
  const uint16_t* yp = bits(y);
  const int64_t n = x.numel();
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) xp[i] = to_bf16(f32(xp[i]) + f32(yp[i]));
}

}  // namespace

// The bound weights of one decoder stack and its step.
class DecoderStep {
 public:
  // norms (and their biases, empty for RMSNorm or none): 2 per layer (before attention, before the FFN), RMSNorm
  // or LayerNorm; linears: 4 per layer (Q/K/V fused, W_O, gate/up fused or W_1, W_2), each given as (packed,
  // rows, scale or empty, bias or empty, vnni); the FFN gated or not, its activation (`Activation`).
  DecoderStep(std::vector<at::Tensor> norms, std::vector<at::Tensor> norm_biases, std::vector<double> eps,
              bool layer_norm, std::vector<at::Tensor> packed, std::vector<int64_t> rows,
              std::vector<at::Tensor> scales, std::vector<at::Tensor> biases, std::vector<bool> vnni, bool gated,
              int64_t activation, int64_t heads, int64_t kv_heads, int64_t head_dim)
      : norms_(std::move(norms)), eps_(std::move(eps)), layer_norm_(layer_norm), gated_(gated),
        activation_(activation), h_(heads), h_kv_(kv_heads), d_(head_dim) {
    TORCH_CHECK(packed.size() % 4 == 0 && norms_.size() * 2 == packed.size() && eps_.size() == norms_.size() &&
                norm_biases.size() == norms_.size(), "4 linears and 2 norms per layer");
    TORCH_CHECK(rows.size() == packed.size() && scales.size() == packed.size() && biases.size() == packed.size() &&
                vnni.size() == packed.size(), "one entry per linear");
    TORCH_CHECK(d_ % 2 == 0 && h_ % h_kv_ == 0, "an even head size, heads that group evenly");
    TORCH_CHECK(activation_ >= SILU && activation_ <= GELU_TANH, "an activation of model/layers.py");
    for (const auto& b : norm_biases) norm_biases_.push_back(given(b));
    for (size_t i = 0; i < packed.size(); ++i)
      linears_.push_back({packed[i], rows[i], given(scales[i]), given(biases[i]), vnni[i]});
  }

  int64_t num_layers() const { return static_cast<int64_t>(linears_.size() / 4); }

  // x (N, D) bfloat16, the embedded tokens; cos, sin (N, d) the rows' rotary angles (sin's first half negated,
  // model/layers.py), or empty where positions were added to x; k_cache, v_cache (layers, blocks, bs, h_kv, d);
  // write_slots (N,) each row's slot in the pool; tables, row_table, context_lens as paged_attention takes them.
  // Returns the last layer's output (N, D).
  at::Tensor forward(const at::Tensor& x_in, const at::Tensor& cos, const at::Tensor& sin, at::Tensor& k_cache,
                     at::Tensor& v_cache, const at::Tensor& write_slots, const at::Tensor& tables,
                     const at::Tensor& row_table, const at::Tensor& context_lens) const {
    TORCH_CHECK(x_in.dim() == 2 && x_in.scalar_type() == at::kBFloat16, "x: (N, D) bfloat16");
    TORCH_CHECK(k_cache.scalar_type() == at::kBFloat16 && k_cache.is_contiguous() && v_cache.is_contiguous() &&
                k_cache.dim() == 5 && k_cache.size(0) == num_layers() && k_cache.size(3) == h_kv_ &&
                k_cache.size(4) == d_ && v_cache.sizes() == k_cache.sizes(), "the pool: (L, blocks, bs, h_kv, d)");
    const int64_t N = x_in.size(0);
    const bool rotary = cos.numel() > 0;
    TORCH_CHECK(!rotary || (cos.sizes() == sin.sizes() && cos.size(0) == N && cos.size(1) == d_),
                "one rotary row per row");
    TORCH_CHECK(write_slots.size(0) == N, "one slot per row");
    at::Tensor x = x_in.clone();
    const at::Tensor c = cos.contiguous(), s = sin.contiguous(), slots = write_slots.to(at::kLong).contiguous();
    const double scale = 1.0 / std::sqrt(static_cast<double>(d_));
    for (int64_t l = 0; l < num_layers(); ++l) {
      const Linear* w = &linears_[4 * l];
      at::Tensor qkv = w[0](norm(x, 2 * l));  // (N, (h + 2 h_kv) d)
      at::Tensor k_l = k_cache.select(0, l), v_l = v_cache.select(0, l);
      at::Tensor q = rotate_and_store(qkv, rotary, c, s, slots, k_l, v_l);  // (N, h, d)
      at::Tensor o = attnserve::paged_attention(q, k_l, v_l, tables, row_table, context_lens, scale);
      add_into(x, w[1](o.view({N, h_ * d_})));
      at::Tensor hidden = w[2](norm(x, 2 * l + 1));  // (N, 2 F) gated, else (N, F)
      add_into(x, w[3](ffn_activation(hidden)));
    }
    return x;
  }

 private:
  at::Tensor norm(const at::Tensor& x, int64_t i) const {
    return layer_norm_ ? layer_norm(x, norms_[i], norm_biases_[i], eps_[i]) : attnserve::rms_norm(x, norms_[i], eps_[i]);
  }

  // q and k rotated by their rows' angles (x cos + rotate_half(x) sin, each product and the sum rounded as torch
  // rounds them) where positions are rotary, q returned as (N, h, d); k and v written to the rows' slots of this
  // layer's pool.
  at::Tensor rotate_and_store(const at::Tensor& qkv, bool rotary, const at::Tensor& cos, const at::Tensor& sin,
                              const at::Tensor& slots, at::Tensor& k_l, at::Tensor& v_l) const {
    const int64_t N = qkv.size(0), d = d_, half = d_ / 2, width = qkv.size(1);
    at::Tensor q = at::empty({N, h_, d}, qkv.options());
    const uint16_t* src = bits(qkv);
    const uint16_t *cp = rotary ? bits(cos) : nullptr, *sp = rotary ? bits(sin) : nullptr;
    uint16_t* qp = bits_mut(q);
    uint16_t *kp = bits_mut(k_l), *vp = bits_mut(v_l);
    const int64_t* slot = slots.data_ptr<int64_t>();
    const int64_t token = h_kv_ * d;  // one slot of the pool
    auto rotate = [&](const uint16_t* x, const uint16_t* cr, const uint16_t* sr, uint16_t* out) {
      if (cr == nullptr) {
        std::memcpy(out, x, d * sizeof(uint16_t));
        return;
      }
#pragma omp simd
      for (int64_t i = 0; i < d; ++i) {
        const int64_t j = i < half ? i + half : i - half;  // roll by d / 2
        out[i] = to_bf16(f32(to_bf16(f32(x[i]) * f32(cr[i]))) + f32(to_bf16(f32(x[j]) * f32(sr[i]))));
      }
    };
    for (int64_t n = 0; n < N; ++n) {
      const uint16_t* row = src + n * width;
      const uint16_t *cr = rotary ? cp + n * d : nullptr, *sr = rotary ? sp + n * d : nullptr;
      for (int64_t i = 0; i < h_; ++i) rotate(row + i * d, cr, sr, qp + (n * h_ + i) * d);
      for (int64_t i = 0; i < h_kv_; ++i) rotate(row + (h_ + i) * d, cr, sr, kp + slot[n] * token + i * d);
      std::memcpy(vp + slot[n] * token, row + (h_ + h_kv_) * d, token * sizeof(uint16_t));
    }
    return q;
  }

  // The FFN's hidden layer: gated (N, 2 F) -> act(gate) * up, else (N, F) -> act(x).
  at::Tensor ffn_activation(const at::Tensor& hidden) const {
    const int64_t N = hidden.size(0), F = gated_ ? hidden.size(1) / 2 : hidden.size(1);
    at::Tensor out = at::empty({N, F}, hidden.options());
    const uint16_t* hp = bits(hidden);
    uint16_t* op = bits_mut(out);
    const auto row = activation_ == SILU ? activate_row<SILU> : activation_ == RELU ? activate_row<RELU>
                     : activation_ == GELU ? activate_row<GELU> : activate_row<GELU_TANH>;
    const bool gated = gated_;
    at::parallel_for(0, N, 8, [&](int64_t begin, int64_t end) {
      for (int64_t n = begin; n < end; ++n) row(hp + n * hidden.size(1), F, gated, op + n * F);
    });
    return out;
  }

  std::vector<at::Tensor> norms_;
  std::vector<c10::optional<at::Tensor>> norm_biases_;
  std::vector<double> eps_;
  bool layer_norm_, gated_;
  int64_t activation_;
  std::vector<Linear> linears_;
  int64_t h_, h_kv_, d_;
};

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  pybind11::class_<DecoderStep>(m, "DecoderStep")
      .def(pybind11::init<std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<double>, bool,
                          std::vector<at::Tensor>, std::vector<int64_t>, std::vector<at::Tensor>,
                          std::vector<at::Tensor>, std::vector<bool>, bool, int64_t, int64_t, int64_t, int64_t>())
      .def("forward", &DecoderStep::forward, pybind11::call_guard<pybind11::gil_scoped_release>(),
           "the stack's step over x (N, D): every layer in one call (CPU, bfloat16)")
      .def_property_readonly("num_layers", &DecoderStep::num_layers);
  m.def("available", &attnserve::available, "whether the linked matvec kernel has AVX-512 BF16");
  m.def("has_vnni", &attnserve::has_vnni, "whether the linked matvec kernel has AVX-512 VNNI");
}

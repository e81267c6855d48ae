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
// Activations are bfloat16 or float32, the pool the same or bfloat16 under float32 (`--kv-cache-dtype`); the
// weights are packed once (model/cpu_linear.py) and bound to a `DecoderStep` object at load time, so a step passes
// only its activations and its block tables. `inputs` and `logits` take the step from token ids to the sampled
// rows' logits (embedding, rotary tables, final norm, LM head bound too), and `greedy` is the sampler's argmax, so
// a one-row step leaves C++ only between those calls.
#include "kernels.h"
#include "elementwise.h"
#include "decoder_rows.h"
#include <ATen/Parallel.h>

#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <vector>

namespace {

using namespace attnserve::elementwise;
using namespace attnserve::rows;

// A linear packed by model/cpu_linear.py: float32, bfloat16, int8 widened in registers, int8 x int8 with a scale
// per row (`linear_q8`) or with a float16 scale per 32 features of a row (`linear_q8_blocks`: Q8_0's form).
enum Product { PLAIN = 0, Q8 = 1, Q8_BLOCKS = 2 };

struct Linear {
  at::Tensor packed;
  int64_t n;
  c10::optional<at::Tensor> scale, bias;
  int64_t product;
  at::Tensor operator()(const at::Tensor& x) const {
    if (packed.scalar_type() == at::kFloat) return attnserve::linear_f32(x, packed, n, bias);
    if (product == Q8_BLOCKS) return attnserve::linear_q8_blocks(x, packed, n, *scale, bias);
    return product == Q8 ? attnserve::linear_q8(x, packed, n, *scale, bias)
                         : attnserve::linear(x, packed, n, scale, bias);
  }
};

c10::optional<at::Tensor> given(const at::Tensor& t) {
  return t.defined() && t.numel() ? c10::optional(t) : c10::nullopt;
}

}  // namespace

// The bound weights of one decoder stack and its step.
class DecoderStep {
 public:
  // norms (and their biases, empty for RMSNorm or none): 2 per layer (before attention, before the FFN), RMSNorm
  // or LayerNorm; linears: 4 per layer (Q/K/V fused, W_O, gate/up fused or W_1, W_2), each given as (packed,
  // rows, scale or empty, bias or empty, whether int8 x int8); the FFN gated or not, its activation (`Activation`).
  DecoderStep(std::vector<at::Tensor> norms, std::vector<at::Tensor> norm_biases, std::vector<double> eps,
              bool layer_norm, std::vector<at::Tensor> packed, std::vector<int64_t> rows,
              std::vector<at::Tensor> scales, std::vector<at::Tensor> biases, std::vector<bool> q8, bool gated,
              int64_t activation, int64_t heads, int64_t kv_heads, int64_t head_dim)
      : norms_(std::move(norms)), eps_(std::move(eps)), layer_norm_(layer_norm), gated_(gated),
        activation_(activation), h_(heads), h_kv_(kv_heads), d_(head_dim) {
    TORCH_CHECK(packed.size() % 4 == 0 && norms_.size() * 2 == packed.size() && eps_.size() == norms_.size() &&
                norm_biases.size() == norms_.size(), "4 linears and 2 norms per layer");
    TORCH_CHECK(rows.size() == packed.size() && scales.size() == packed.size() && biases.size() == packed.size() &&
                q8.size() == packed.size(), "one entry per linear");
    TORCH_CHECK(d_ % 2 == 0 && h_ % h_kv_ == 0, "an even head size, heads that group evenly");
    TORCH_CHECK(activation_ >= SILU && activation_ <= GELU_TANH, "an activation of model/layers.py");
    for (const auto& b : norm_biases) norm_biases_.push_back(given(b));
    for (size_t i = 0; i < packed.size(); ++i)
      linears_.push_back({packed[i], rows[i], given(scales[i]), given(biases[i]), q8[i] ? Q8 : PLAIN});
  }

  // What turns token ids and positions into the stack's input, for `inputs`: the token embedding (V, D) and its
  // scale (1 or sqrt(D)), the added position table (P, D) or empty, the rotary cos and sin tables (P, d) or empty
  // (model/fused_step.py computes them with the model's own ops), all in the activations' dtype.
  void bind_inputs(const at::Tensor& embed, double scale, const at::Tensor& added, const at::Tensor& cos,
                   const at::Tensor& sin) {
    TORCH_CHECK(embed.dim() == 2 && embed.is_contiguous(), "embed: (V, D)");
    TORCH_CHECK(!added.numel() || (added.dim() == 2 && added.size(1) == embed.size(1) && added.is_contiguous()),
                "positions: (P, D)");
    TORCH_CHECK(cos.sizes() == sin.sizes() && (!cos.numel() || (cos.dim() == 2 && cos.size(1) == d_)) &&
                cos.is_contiguous() && sin.is_contiguous(), "cos, sin: (P, d)");
    embed_ = embed, added_ = added, cos_ = cos, sin_ = sin, embed_scale_ = scale;
  }

  // x (N, D), cos, sin (N, d) (empty without rotary) for token ids and positions (N,), as the model's embed()
  // and rotations() give them: each row looked up, scaled and summed in the activations' dtype, rounded as torch
  // rounds each op.
  std::tuple<at::Tensor, at::Tensor, at::Tensor> inputs(const at::Tensor& tokens, const at::Tensor& positions) const {
    TORCH_CHECK(embed_.defined(), "no inputs bound (bind_inputs)");
    const at::Tensor tok = tokens.to(at::kLong).contiguous(), pos = positions.to(at::kLong).contiguous();
    TORCH_CHECK(tok.dim() == 1 && pos.sizes() == tok.sizes(), "tokens, positions: (N,) each");
    const int64_t N = tok.size(0), D = embed_.size(1), V = embed_.size(0);
    const int64_t P = added_.numel() ? added_.size(0) : cos_.numel() ? cos_.size(0) : INT64_MAX;
    const int64_t *tp = tok.data_ptr<int64_t>(), *pp = pos.data_ptr<int64_t>();
    for (int64_t n = 0; n < N; ++n)
      TORCH_CHECK(tp[n] >= 0 && tp[n] < V && pp[n] >= 0 && pp[n] < P, "a token id or a position out of range");
    at::Tensor x = at::empty({N, D}, embed_.options());
    if (embed_.scalar_type() == at::kFloat) embed_rows<float>(embed_, embed_scale_, added_, tp, pp, N, x);
    else embed_rows<bf16>(embed_, embed_scale_, added_, tp, pp, N, x);
    if (!cos_.numel()) return {x, cos_, sin_};
    return {x, cos_.index_select(0, pos), sin_.index_select(0, pos)};
  }

  // The final norm and the LM head (`product`: `Product`), for `logits`.
  void bind_head(const at::Tensor& norm, const at::Tensor& norm_bias, double eps, const at::Tensor& packed,
                 int64_t rows, const at::Tensor& scale, const at::Tensor& bias, int64_t product) {
    TORCH_CHECK(product >= PLAIN && product <= Q8_BLOCKS && (product == PLAIN || scale.numel()), "a head's product");
    final_norm_ = norm;
    final_bias_ = given(norm_bias);
    final_eps_ = eps;
    head_ = Linear{packed, rows, given(scale), given(bias), product};
  }

  int64_t num_layers() const { return static_cast<int64_t>(linears_.size() / 4); }
  bool has_head() const { return head_.has_value(); }

  // x (N, D) bfloat16, the embedded tokens; cos, sin (N, d) the rows' rotary angles (sin's first half negated,
  // model/layers.py), or empty where positions were added to x; k_cache, v_cache (layers, blocks, bs, h_kv, d);
  // write_slots (N,) each row's slot in the pool; tables, row_table, context_lens as paged_attention takes them.
  // Returns the last layer's output (N, D).
  at::Tensor forward(const at::Tensor& x_in, const at::Tensor& cos, const at::Tensor& sin, at::Tensor& k_cache,
                     at::Tensor& v_cache, const at::Tensor& write_slots, const at::Tensor& tables,
                     const at::Tensor& row_table, const at::Tensor& context_lens) const {
    TORCH_CHECK(x_in.dim() == 2 && (x_in.scalar_type() == at::kBFloat16 || x_in.scalar_type() == at::kFloat),
                "x: (N, D) bfloat16 or float32");
    if (x_in.scalar_type() == at::kFloat && k_cache.scalar_type() == at::kBFloat16)
      return run<float, bf16>(x_in, cos, sin, k_cache, v_cache, write_slots, tables, row_table, context_lens);
    if (x_in.scalar_type() == at::kFloat)
      return run<float, float>(x_in, cos, sin, k_cache, v_cache, write_slots, tables, row_table, context_lens);
    return run<bf16, bf16>(x_in, cos, sin, k_cache, v_cache, write_slots, tables, row_table, context_lens);
  }

  // The step's float32 logits (R, vocab) at `rows` (R,) of the stack's output: final norm and LM head in the same
  // call, so that a one-row step leaves C++ once, with what the sampler reads.
  at::Tensor logits(const at::Tensor& x_in, const at::Tensor& cos, const at::Tensor& sin, at::Tensor& k_cache,
                    at::Tensor& v_cache, const at::Tensor& write_slots, const at::Tensor& tables,
                    const at::Tensor& row_table, const at::Tensor& context_lens, const at::Tensor& rows) const {
    TORCH_CHECK(head_.has_value(), "no head bound (bind_head)");
    const at::Tensor x = forward(x_in, cos, sin, k_cache, v_cache, write_slots, tables, row_table, context_lens)
                             .index_select(0, rows);
    at::Tensor normed;
    if (!layer_norm_) normed = attnserve::rms_norm(x, final_norm_, final_eps_);
    else if (x.scalar_type() == at::kFloat) normed = layer_norm<float>(x, final_norm_, final_bias_, final_eps_);
    else normed = layer_norm<bf16>(x, final_norm_, final_bias_, final_eps_);
    return (*head_)(normed).to(at::kFloat);
  }

 private:
  template <typename T, typename P>  // P: the pool's dtype
  at::Tensor run(const at::Tensor& x_in, const at::Tensor& cos, const at::Tensor& sin, at::Tensor& k_cache,
                 at::Tensor& v_cache, const at::Tensor& write_slots, const at::Tensor& tables,
                 const at::Tensor& row_table, const at::Tensor& context_lens) const {
    TORCH_CHECK(k_cache.scalar_type() == c10::CppTypeToScalarType<P>::value && k_cache.is_contiguous() &&
                v_cache.is_contiguous() && k_cache.dim() == 5 && k_cache.size(0) == num_layers() &&
                k_cache.size(3) == h_kv_ && k_cache.size(4) == d_ && v_cache.sizes() == k_cache.sizes(),
                "the pool: (L, blocks, bs, h_kv, d)");
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
      at::Tensor qkv = w[0](norm<T>(x, 2 * l));  // (N, (h + 2 h_kv) d)
      at::Tensor k_l = k_cache.select(0, l), v_l = v_cache.select(0, l);
      at::Tensor q = rotate_and_store<T, P>(qkv, rotary, c, s, slots, k_l, v_l);  // (N, h, d)
      at::Tensor o = attnserve::paged_attention(q, k_l, v_l, tables, row_table, context_lens, scale);
      add_into<T>(x, w[1](o.view({N, h_ * d_})));
      at::Tensor hidden = w[2](norm<T>(x, 2 * l + 1));  // (N, 2 F) gated, else (N, F)
      add_into<T>(x, w[3](ffn_activation<T>(hidden)));
    }
    return x;
  }

  template <typename T>
  at::Tensor norm(const at::Tensor& x, int64_t i) const {
    return layer_norm_ ? layer_norm<T>(x, norms_[i], norm_biases_[i], eps_[i])
                       : attnserve::rms_norm(x, norms_[i], eps_[i]);
  }

  // q and k rotated by their rows' angles (x cos + rotate_half(x) sin, each product and the sum rounded as torch
  // rounds them) where positions are rotary, q returned as (N, h, d); k and v written to the rows' slots of this
  // layer's pool (rounded to the pool's dtype where it is narrower).
  template <typename T, typename P>
  at::Tensor rotate_and_store(const at::Tensor& qkv, bool rotary, const at::Tensor& cos, const at::Tensor& sin,
                              const at::Tensor& slots, at::Tensor& k_l, at::Tensor& v_l) const {
    using E = Elem<T>;
    using S = typename E::S;
    const int64_t N = qkv.size(0), d = d_, half = d_ / 2, width = qkv.size(1);
    at::Tensor q = at::empty({N, h_, d}, qkv.options());
    const S* src = in<T>(qkv);
    const S *cp = rotary ? in<T>(cos) : nullptr, *sp = rotary ? in<T>(sin) : nullptr;
    S* qp = out<T>(q);
    using PS = typename Elem<P>::S;
    PS *kp = out<P>(k_l), *vp = out<P>(v_l);
    constexpr bool same = std::is_same_v<S, PS>;
    TORCH_CHECK(same || d <= 512, "a head size of at most 512");
    auto store = [&](const S* x, PS* o) {  // one head's row into the pool
      if constexpr (same) std::memcpy(o, x, d * sizeof(S));
      else for (int64_t i = 0; i < d; ++i) o[i] = Elem<P>::put(E::get(x[i]));
    };
    const int64_t* slot = slots.data_ptr<int64_t>();
    const int64_t token = h_kv_ * d;  // one slot of the pool
    auto rotate = [&](const S* x, const S* cr, const S* sr, S* o) {
      if (cr == nullptr) {
        std::memcpy(o, x, d * sizeof(S));
        return;
      }
#pragma omp simd
      for (int64_t i = 0; i < d; ++i) {
        const int64_t j = i < half ? i + half : i - half;  // roll by d / 2
        o[i] = E::put(E::get(E::put(E::get(x[i]) * E::get(cr[i]))) + E::get(E::put(E::get(x[j]) * E::get(sr[i]))));
      }
    };
    // rows write distinct slots (padding rows only the null block, which no row reads)
    at::parallel_for(0, N, 4, [&](int64_t begin, int64_t end) {
      S buf[512];  // a K row before its rounding into a narrower pool
      for (int64_t n = begin; n < end; ++n) {
        const S* row = src + n * width;
        const S *cr = rotary ? cp + n * d : nullptr, *sr = rotary ? sp + n * d : nullptr;
        for (int64_t i = 0; i < h_; ++i) rotate(row + i * d, cr, sr, qp + (n * h_ + i) * d);
        for (int64_t i = 0; i < h_kv_; ++i) {
          if constexpr (same) {
            rotate(row + (h_ + i) * d, cr, sr, kp + slot[n] * token + i * d);
          } else {
            rotate(row + (h_ + i) * d, cr, sr, buf);
            store(buf, kp + slot[n] * token + i * d);
          }
        }
        for (int64_t i = 0; i < h_kv_; ++i) store(row + (h_ + h_kv_ + i) * d, vp + slot[n] * token + i * d);
      }
    });
    return q;
  }

  // The FFN's hidden layer: gated (N, 2 F) -> act(gate) * up, else (N, F) -> act(x).
  template <typename T>
  at::Tensor ffn_activation(const at::Tensor& hidden) const {
    const int64_t N = hidden.size(0), F = gated_ ? hidden.size(1) / 2 : hidden.size(1), width = hidden.size(1);
    at::Tensor result = at::empty({N, F}, hidden.options());
    const auto* hp = in<T>(hidden);
    auto* op = out<T>(result);
    const auto row = activation_ == SILU ? activate_row<SILU, T> : activation_ == RELU ? activate_row<RELU, T>
                     : activation_ == GELU ? activate_row<GELU, T> : activate_row<GELU_TANH, T>;
    const bool gated = gated_;
    at::parallel_for(0, N, 8, [&](int64_t begin, int64_t end) {
      for (int64_t n = begin; n < end; ++n) row(hp + n * width, F, gated, op + n * F);
    });
    return result;
  }

  std::vector<at::Tensor> norms_;
  std::vector<c10::optional<at::Tensor>> norm_biases_;
  std::vector<double> eps_;
  bool layer_norm_, gated_;
  int64_t activation_;
  std::vector<Linear> linears_;
  int64_t h_, h_kv_, d_;
  at::Tensor final_norm_;
  c10::optional<at::Tensor> final_bias_;
  double final_eps_ = 0.0;
  c10::optional<Linear> head_;
  at::Tensor embed_, added_, cos_, sin_;
  double embed_scale_ = 1.0;
};

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  pybind11::class_<DecoderStep>(m, "DecoderStep")
      .def(pybind11::init<std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<double>, bool,
                          std::vector<at::Tensor>, std::vector<int64_t>, std::vector<at::Tensor>,
                          std::vector<at::Tensor>, std::vector<bool>, bool, int64_t, int64_t, int64_t, int64_t>())
      .def("forward", &DecoderStep::forward, pybind11::call_guard<pybind11::gil_scoped_release>(),
           "the stack's step over x (N, D): every layer in one call (CPU, bfloat16 or float32)")
      .def("bind_inputs", &DecoderStep::bind_inputs, "the embedding, added positions and rotary tables, for inputs")
      .def("inputs", &DecoderStep::inputs, "x, cos, sin for token ids and positions (N,) each")
      .def("bind_head", &DecoderStep::bind_head, "the final norm and the LM head, for logits")
      .def("logits", &DecoderStep::logits, pybind11::call_guard<pybind11::gil_scoped_release>(),
           "forward, then the final norm and the head at the given rows: float32 logits (R, vocab)")
      .def_property_readonly("has_head", [](const DecoderStep& s) { return s.has_head(); })
      .def_property_readonly("num_layers", &DecoderStep::num_layers);
  m.def("greedy", &attnserve::rows::greedy,
        "each row's argmax (first) and whether its max is not finite: (R, 2) float32");
  m.def("available", &attnserve::available, "whether the linked matvec kernel is built (AVX-512 BF16 or AVX2 + FMA)");
  m.def("has_q8", &attnserve::has_q8, "whether the linked matvec kernel has the int8 x int8 product");
}

// y = x W^T (* scale) (+ bias) for the few rows of a decode step, reading the weight once at the machine's memory
// bandwidth.
//
// At one stream a CPU decode step is a chain of matrix-vector products, each bound by reading its weight from
// memory; at a few streams still nearly so. oneDNN's GEMM reads a bfloat16 weight at ~15-30 GB/s there (by shape)
// and torch's int8 weight-only kernel at ~13-15 GB/s, falling with rows (it re-reads the weight for every 4 rows),
// against the ~30 GB/s the machine can read (benchmarks/matvec.py).
//
// The weight is packed once, at load time (model/cpu_linear.py): rows in panels of 16, and within a panel, for
// each pair of input features (k, k+1), the 16 rows' two values side by side: packed[panel][k/2][row][2]. That
// is the operand layout of AVX-512 BF16's pair dot product (vdpbf16ps): one 64-byte load gives 16 rows' values
// for two features; x's two values are broadcast; 16 output rows accumulate in the 16 float32 lanes of one
// register, with no horizontal sums. Each thread takes 32 rows (two panels) at a time and multiplies them with up
// to 8 rows of x while they are in cache, so the weight is read from memory once per call.
//
// Weights: bfloat16, or weight-only int8 with one float32 scale per row (model/quantize.py), widened to bfloat16 in
// registers (|q| <= 127 is exact in bfloat16). x (float32 or bfloat16) is rounded to bfloat16 once per call; sums
// are float32; y comes out in x's dtype. Every output goes through the same operations whatever the number of
// rows of x, so batching does not change a row's result. A float32 weight has its own loop in float32 throughout
// (matvec_f32.h, `linear_f32`).
//
// Two builds of the same entry points, by what the compiler targets (-march=native):
// - AVX-512 BF16 (and BW): the loops here, matvec_f32.h, and with AVX-512 VNNI the int8 x int8 product
//   (matvec_vnni.h, `linear_q8`);
// - else AVX2 + FMA: matvec_avx2.h, the same layouts and arithmetic in 8-lane registers (bfloat16 pairs split
//   into two float32 values by a shift and a mask, two FMAs; int8 converted to float32; float32 as is), and the
//   int8 x int8 product with vpmaddubsw (matvec_q8_avx2.h, the same `linear_q8`).
// Elsewhere `available()` is false and the caller keeps oneDNN / torch.
#include "kernels.h"
#include "share_items.h"
#include <ATen/Parallel.h>
#if defined(__AVX512BF16__) && defined(__AVX512BW__)
#include <immintrin.h>
#define ATTNSERVE_MATVEC 1
#define ATTNSERVE_MATVEC_AVX512 1
#elif defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define ATTNSERVE_MATVEC 1
#define ATTNSERVE_MATVEC_AVX2 1
#endif

#include <algorithm>
#include <bit>
#include <cstdint>
#include <cmath>
#include <cstring>
#include <vector>

namespace {

constexpr int64_t PANEL = 16;  // rows per panel: one register of float32 sums
constexpr int64_t NP = 2;      // panels per work item (32 rows)
constexpr int64_t MT = 8;      // rows of x per tile: NP x MT sums, NP weight and 1 x register of 32

#if defined(ATTNSERVE_MATVEC_AVX512)
// 16 rows x 2 features of the packed weight as bfloat16 pairs.
inline __m512bh load_pairs(const at::BFloat16* p) { return (__m512bh)_mm512_loadu_si512(p); }
inline __m512bh load_pairs(const int8_t* p) {
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(raw)));
  const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(raw, 1)));
  return _mm512_cvtne2ps_pbh(hi, lo);  // 32 values in order: lo's 16 first
}

// sums[i][p] = 16 float32 outputs for x row m0 + i and panel p of the item starting at `w` (K2 pairs per panel).
template <int R, typename W>
inline void tile(const uint32_t* x, int64_t K2, const W* w, __m512 (&sums)[MT][NP]) {
  __m512 acc[R][NP];
  for (int i = 0; i < R; ++i)
    for (int p = 0; p < NP; ++p) acc[i][p] = _mm512_setzero_ps();
  for (int64_t kp = 0; kp < K2; ++kp) {
    __m512bh wv[NP];
    for (int p = 0; p < NP; ++p) wv[p] = load_pairs(w + (p * K2 + kp) * 2 * PANEL);
    for (int i = 0; i < R; ++i) {
      const __m512bh xv = (__m512bh)_mm512_set1_epi32(static_cast<int>(x[i * K2 + kp]));
      for (int p = 0; p < NP; ++p) acc[i][p] = _mm512_dpbf16_ps(acc[i][p], xv, wv[p]);
    }
  }
  for (int i = 0; i < R; ++i)
    for (int p = 0; p < NP; ++p) sums[i][p] = acc[i][p];
}

// y rows m0 .. m0 + r of the item's 32 outputs from their float32 sums: times the row's scale, plus its bias.
template <typename Out>
inline void store_rows(const __m512 (&sums)[MT][NP], int64_t r, int64_t m0, int64_t item, int64_t N,
                       const float* scale, const float* bias, Out* y) {
  alignas(64) float out[PANEL];
  for (int64_t i = 0; i < r; ++i)
    for (int64_t p = 0; p < NP; ++p) {
      const int64_t n0 = (item * NP + p) * PANEL, count = std::min(PANEL, N - n0);
      if (count <= 0) break;
      __m512 v = sums[i][p];
      if (scale != nullptr) v = _mm512_mul_ps(v, _mm512_loadu_ps(scale + n0));  // scales padded to panels
      if (bias != nullptr) v = _mm512_add_ps(v, _mm512_loadu_ps(bias + n0));
      _mm512_store_ps(out, v);
      Out* dst = y + (m0 + i) * N + n0;
      for (int64_t j = 0; j < count; ++j) dst[j] = static_cast<Out>(out[j]);
    }
}

template <typename W, typename Out>
void run(const uint32_t* x, int64_t M, int64_t K2, const W* w, int64_t N, const float* scale, const float* bias,
         Out* y) {
  const int64_t items = (N + NP * PANEL - 1) / (NP * PANEL);
  at::parallel_for(0, items, 1, [&](int64_t begin, int64_t end) {
    __m512 sums[MT][NP];
    for (int64_t item = begin; item < end; ++item) {
      const W* wi = w + item * NP * K2 * 2 * PANEL;
      for (int64_t m0 = 0; m0 < M; m0 += MT) {
        const int64_t r = std::min(MT, M - m0);
        const uint32_t* xt = x + m0 * K2;
        switch (r) {
          case 8: tile<8>(xt, K2, wi, sums); break;
          case 7: tile<7>(xt, K2, wi, sums); break;
          case 6: tile<6>(xt, K2, wi, sums); break;
          case 5: tile<5>(xt, K2, wi, sums); break;
          case 4: tile<4>(xt, K2, wi, sums); break;
          case 3: tile<3>(xt, K2, wi, sums); break;
          case 2: tile<2>(xt, K2, wi, sums); break;
          default: tile<1>(xt, K2, wi, sums); break;
        }
        store_rows(sums, r, m0, item, N, scale, bias, y);
      }
    }
  });
}

#include "matvec_f32.h"
#if defined(__AVX512VNNI__)
#define ATTNSERVE_Q8 1
#define ATTNSERVE_Q8_BLOCKS 1
#include "matvec_vnni.h"
#endif
#elif defined(ATTNSERVE_MATVEC_AVX2)
#include "matvec_avx2.h"
#define ATTNSERVE_Q8 1
#if defined(__F16C__)
#define ATTNSERVE_Q8_BLOCKS 1
#endif
#include "matvec_q8_avx2.h"
#endif

}  // namespace

namespace attnserve {

// x (M, K) float32 or bfloat16; packed (N padded to 32, K padded to even) from pack(); scale and bias, if given,
// float32 padded to N's padding; n the true number of rows.
at::Tensor linear(const at::Tensor& x, const at::Tensor& packed, int64_t n, const c10::optional<at::Tensor>& scale,
                  const c10::optional<at::Tensor>& bias) {
#if defined(ATTNSERVE_MATVEC)
  TORCH_CHECK(x.dim() == 2, "x must be (M, K)");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, "x: float32 or bfloat16");
  TORCH_CHECK(packed.dim() == 4 && packed.is_contiguous() && packed.size(2) == PANEL && packed.size(3) == 2 &&
              packed.size(0) % NP == 0, "packed must come from pack()");
  const bool int8 = packed.scalar_type() == at::kChar;
  TORCH_CHECK(int8 || packed.scalar_type() == at::kBFloat16, "packed: bfloat16 or int8");
  TORCH_CHECK(int8 == scale.has_value(), "an int8 weight needs its scales, a bfloat16 one none");
  const int64_t M = x.size(0), K = x.size(1), K2 = packed.size(1), rows = packed.size(0) * PANEL;
  TORCH_CHECK(K2 == (K + 1) / 2 && n <= rows && n > rows - NP * PANEL, "x's features or n do not match the weight");
  for (const auto& t : {scale, bias})
    TORCH_CHECK(!t.has_value() || (t->scalar_type() == at::kFloat && t->is_contiguous() && t->numel() == rows),
                "scale and bias: float32, padded like the weight's rows");
  // x as bfloat16 pairs (no copy when it is one already), the last feature zero-padded when K is odd
  at::Tensor xb;
  if (K % 2 == 0) {
    xb = x.to(at::kBFloat16).contiguous();
  } else {
    xb = at::zeros({M, 2 * K2}, x.options().dtype(at::kBFloat16));
    xb.narrow(1, 0, K).copy_(x);
  }
  auto y = at::empty({M, n}, x.options());
  const auto* xp = reinterpret_cast<const uint32_t*>(xb.data_ptr<at::BFloat16>());
  const float* sp = scale.has_value() ? scale->data_ptr<float>() : nullptr;
  const float* bp = bias.has_value() ? bias->data_ptr<float>() : nullptr;
  if (int8 && x.scalar_type() == at::kFloat) run(xp, M, K2, packed.data_ptr<int8_t>(), n, sp, bp, y.data_ptr<float>());
  else if (int8) run(xp, M, K2, packed.data_ptr<int8_t>(), n, sp, bp, y.data_ptr<at::BFloat16>());
  else if (x.scalar_type() == at::kFloat)
    run(xp, M, K2, packed.data_ptr<at::BFloat16>(), n, sp, bp, y.data_ptr<float>());
  else run(xp, M, K2, packed.data_ptr<at::BFloat16>(), n, sp, bp, y.data_ptr<at::BFloat16>());
  return y;
#else
  TORCH_CHECK(false, "matvec: built without AVX-512 BF16 or AVX2 + FMA");
#endif
}

#include "matvec_q8.h"

// float32 x (M, K) times a float32 weight packed by pack_f32(): (N padded to 32 / 16, K, 16); bias as for linear().
at::Tensor linear_f32(const at::Tensor& x, const at::Tensor& packed, int64_t n, const c10::optional<at::Tensor>& bias) {
#if defined(ATTNSERVE_MATVEC)
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat, "x must be (M, K) float32");
  TORCH_CHECK(packed.dim() == 3 && packed.is_contiguous() && packed.scalar_type() == at::kFloat &&
              packed.size(2) == PANEL && packed.size(0) % NP == 0, "packed must come from pack_f32()");
  const int64_t M = x.size(0), K = x.size(1), rows = packed.size(0) * PANEL;
  TORCH_CHECK(packed.size(1) == K && n <= rows && n > rows - NP * PANEL, "x's features or n do not match the weight");
  TORCH_CHECK(!bias.has_value() || (bias->scalar_type() == at::kFloat && bias->is_contiguous() &&
              bias->numel() == rows), "bias: float32, padded like the weight's rows");
  const at::Tensor xc = x.contiguous();
  auto y = at::empty({M, n}, x.options());
  run_f32(xc.data_ptr<float>(), M, K, packed.data_ptr<float>(), n, bias.has_value() ? bias->data_ptr<float>() : nullptr,
          y.data_ptr<float>());
  return y;
#else
  TORCH_CHECK(false, "matvec: built without AVX-512 BF16 or AVX2 + FMA");
#endif
}

bool has_q8() {
#if defined(ATTNSERVE_Q8)
  return true;
#else
  return false;
#endif
}

bool has_q8_blocks() {
#if defined(ATTNSERVE_Q8_BLOCKS)
  return true;
#else
  return false;
#endif
}

bool available() {
#if defined(ATTNSERVE_MATVEC)
  return true;
#else
  return false;
#endif
}

const char* isa() {
#if defined(ATTNSERVE_MATVEC_AVX512)
  return "avx512bf16";
#elif defined(ATTNSERVE_MATVEC_AVX2)
  return "avx2";
#else
  return "";
#endif
}

}  // namespace attnserve

#if !defined(ATTNSERVE_NO_BINDINGS)
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("linear", &attnserve::linear, "y = x W^T (* scale) (+ bias) over a packed bfloat16 or int8 weight (CPU)");
  m.def("available", &attnserve::available, "whether this build has the kernel (AVX-512 BF16, or AVX2 + FMA)");
  m.def("isa", &attnserve::isa, "which build: 'avx512bf16', 'avx2', or '' (none)");
  m.def("linear_q8", &attnserve::linear_q8, "int8 y = x W^T * scale (+ bias), x quantized in blocks of 32 (CPU)");
  m.def("linear_f32", &attnserve::linear_f32, "float32 y = x W^T (+ bias) over a weight packed by pack_f32 (CPU)");
  m.def("linear_q8_blocks", &attnserve::linear_q8_blocks,
        "int8 y = x W^T (+ bias) over a weight with a float16 scale per 32 features of a row (Q8_0's form, CPU)");
  m.def("has_q8_blocks", &attnserve::has_q8_blocks, "whether this build has linear_q8_blocks (AVX-512 VNNI, or AVX2 + F16C)");
  m.def("has_q8", &attnserve::has_q8, "whether this build has the int8 x int8 product (AVX-512 VNNI or AVX2)");
  m.attr("panel") = PANEL;
  m.attr("panels") = NP;
#if defined(ATTNSERVE_MATVEC_AVX512)
  m.attr("quad_offset") = 128;  // pack_quads stores q + 128, VNNI's unsigned operand (matvec_vnni.h)
#else
  m.attr("quad_offset") = 0;  // q itself, signed by x (matvec_q8_avx2.h)
#endif
}
#endif

// The int8 x int8 entry points, `linear_q8` (one float32 scale per row) and `linear_q8_blocks` (a float16 scale
// per 32 features of a row), over the tiles of matvec_vnni.h / matvec_q8_avx2.h. Included by matvec.cpp inside
// namespace attnserve.
#pragma once

#if defined(ATTNSERVE_Q8)
namespace {

// x quantized in blocks of 32 into the calling thread's scratch (reused from call to call: three tensors made per
// product were a measurable share of a one-row product of a few microseconds), then the packed weight's product
// with it; ws (float16 block scales) or null.
at::Tensor q8_product(const at::Tensor& x, const at::Tensor& packed, int64_t n, const float* scale,
                      const c10::optional<at::Tensor>& bias, const uint16_t* ws) {
  const int64_t M = x.size(0), K = x.size(1), blocks = M * (K / QBLOCK);
  const at::Tensor xc = x.contiguous();
  thread_local std::vector<int8_t> xq;
  thread_local std::vector<float> xs;
  thread_local std::vector<int32_t> xsum;
  if (static_cast<int64_t>(xq.size()) < M * K) xq.resize(M * K);
  if (static_cast<int64_t>(xs.size()) < blocks) xs.resize(blocks), xsum.resize(blocks);
  if (x.scalar_type() == at::kFloat) quantize_rows(xc.data_ptr<float>(), M, K, xq.data(), xs.data(), xsum.data());
  else quantize_rows(xc.data_ptr<at::BFloat16>(), M, K, xq.data(), xs.data(), xsum.data());
  auto y = at::empty({M, n}, x.options());
  const float* bp = bias.has_value() ? bias->data_ptr<float>() : nullptr;
  const auto* wp = packed.data_ptr<uint8_t>();
#if !defined(ATTNSERVE_Q8_BLOCKS)
  TORCH_CHECK(ws == nullptr, "matvec: this build has no block scales");
#endif
  if (x.scalar_type() == at::kFloat)
    run_q8(xq.data(), xs.data(), xsum.data(), M, K, wp, n, scale, bp, y.data_ptr<float>(), ws);
  else
    run_q8(xq.data(), xs.data(), xsum.data(), M, K, wp, n, scale, bp, y.data_ptr<at::BFloat16>(), ws);
  return y;
}

void check_q8(const at::Tensor& x, const at::Tensor& packed, int64_t n, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && x.size(1) % QBLOCK == 0, "x must be (M, K), K a multiple of 32");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, "x: float32 or bfloat16");
  TORCH_CHECK(packed.dim() == 4 && packed.is_contiguous() && packed.scalar_type() == at::kByte &&
              packed.size(2) == NP * PANEL && packed.size(3) == 4, "packed must come from pack_quads()");
  const int64_t rows = packed.size(0) * NP * PANEL;
  TORCH_CHECK(packed.size(1) * 4 == x.size(1) && n <= rows && n > rows - NP * PANEL, "x's features or n do not match");
  TORCH_CHECK(!bias.has_value() || (bias->scalar_type() == at::kFloat && bias->is_contiguous() &&
              bias->numel() == rows), "bias: float32, padded like the weight's rows");
}

}  // namespace
#endif

// The int8 x int8 product (VNNI, or AVX2's vpmaddubsw): x (M, K) float32 or bfloat16, K a multiple of 32; packed
// (N padded to 32 / 32, K / 4, 32, 4) uint8 from pack_quads() (q + 128 or q, the build's `quad_offset`); scale
// float32 padded like the rows; bias likewise or None.
at::Tensor linear_q8(const at::Tensor& x, const at::Tensor& packed, int64_t n, const at::Tensor& scale,
                     const c10::optional<at::Tensor>& bias) {
#if defined(ATTNSERVE_Q8)
  check_q8(x, packed, n, bias);
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.is_contiguous() &&
              scale.numel() == packed.size(0) * NP * PANEL, "scale: float32, padded like the weight's rows");
  return q8_product(x, packed, n, scale.data_ptr<float>(), bias, nullptr);
#else
  TORCH_CHECK(false, "matvec: built without AVX-512 VNNI or AVX2");
#endif
}

// The same product over a weight with a float16 scale per block of 32 features of each row (Q8_0's form): scales
// (N padded to 32 / 32, K / 32, 32) from pack_block_scales() (`has_q8_blocks()`).
at::Tensor linear_q8_blocks(const at::Tensor& x, const at::Tensor& packed, int64_t n, const at::Tensor& scales,
                            const c10::optional<at::Tensor>& bias) {
#if defined(ATTNSERVE_Q8_BLOCKS)
  check_q8(x, packed, n, bias);
  TORCH_CHECK(scales.scalar_type() == at::kHalf && scales.is_contiguous() && scales.dim() == 3 &&
              scales.size(0) == packed.size(0) && scales.size(1) * QBLOCK == x.size(1) &&
              scales.size(2) == NP * PANEL, "scales must come from pack_block_scales()");
  return q8_product(x, packed, n, nullptr, bias, reinterpret_cast<const uint16_t*>(scales.data_ptr<at::Half>()));
#else
  TORCH_CHECK(false, "matvec: built without int8 block scales (AVX-512 VNNI, or AVX2 + F16C)");
#endif
}

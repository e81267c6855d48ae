// The kernels' entry points, for a source that calls them from C++ (decoder_step.cpp) instead of from Python.
// Each kernel's source defines its own; built with ATTNSERVE_NO_BINDINGS it leaves out its Python module.
#pragma once
#include <torch/extension.h>

namespace attnserve {

// matvec.cpp: y = x W^T (* scale) (+ bias) over a weight packed by model/cpu_linear.py.
at::Tensor linear(const at::Tensor& x, const at::Tensor& packed, int64_t n, const c10::optional<at::Tensor>& scale,
                  const c10::optional<at::Tensor>& bias);
at::Tensor linear_q8(const at::Tensor& x, const at::Tensor& packed, int64_t n, const at::Tensor& scale,
                     const c10::optional<at::Tensor>& bias);
at::Tensor linear_f32(const at::Tensor& x, const at::Tensor& packed, int64_t n, const c10::optional<at::Tensor>& bias);
at::Tensor linear_q8_blocks(const at::Tensor& x, const at::Tensor& packed, int64_t n, const at::Tensor& scales,
                            const c10::optional<at::Tensor>& bias);
bool available();
bool has_q8();

// paged_attention.cpp: every query row over its block table.
at::Tensor paged_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                           const at::Tensor& tables, const at::Tensor& row_table, const at::Tensor& context_lens,
                           double scale);

// rms_norm.cpp: RMSNorm over the last dimension.
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& g, double eps);

}  // namespace attnserve

// densegrad/core/precision.hpp: the per-thread precision of the products inside float32 GEMMs,
// like torch.set_float32_matmul_precision: "fp32" (the default) multiplies in float32; "bf16"
// lets a kernel round both operands of each product to bfloat16 (round to nearest even) and
// accumulate in float32. Tensors, gradients and master weights stay float32, and so do saved
// activations, with one exception: gelu_conv2d (a dense block's widest tensor) keeps its input
// rounded to bfloat16 and takes the GELU of the rounded values (ops/fused.hpp), on every device.
// Not autocast: no op changes its output dtype, and ops without a bf16 kernel ignore the setting.
// Which kernels honour it today: the GEMMs of ungrouped conv2d (1x1, the stem and the
// transitions; forward, dx and dweight) on CPUs with AVX512-BF16 (backend/cpu/gemm_bf16.hpp)
// and on CUDA GPUs (cuBLAS with bf16 operands, backend/cuda/conv.cuh).
#pragma once

#include <string>

#include "error.hpp"

namespace dg {

/// The precision of the products inside float32 GEMMs.
enum class MatmulPrecision { fp32, bf16 };

namespace detail {
inline MatmulPrecision& matmul_precision_flag() {
  thread_local MatmulPrecision precision = MatmulPrecision::fp32;
  return precision;
}
}  // namespace detail

/// This thread's setting; an op reads it once, in its forward, and its backward uses the same.
inline MatmulPrecision matmul_precision() { return detail::matmul_precision_flag(); }

/// Sets this thread's precision (torch.set_float32_matmul_precision("medium") is bf16).
inline void set_matmul_precision(MatmulPrecision p) { detail::matmul_precision_flag() = p; }

/// "fp32" or "bf16".
inline const char* to_string(MatmulPrecision p) { return p == MatmulPrecision::bf16 ? "bf16" : "fp32"; }

/// Parses "fp32" or "bf16"; anything else is a dg::Error naming what was given.
inline MatmulPrecision parse_matmul_precision(const std::string& s) {
  if (s == "fp32") return MatmulPrecision::fp32;
  if (s == "bf16") return MatmulPrecision::bf16;
  throw Error("matmul precision: expected \"fp32\" or \"bf16\", got \"" + s + "\"");
}

/// RAII: sets this thread's precision while alive, restores the previous one after.
/// Example: { dg::MatmulPrecisionGuard g(dg::MatmulPrecision::bf16); loss = step(model, batch); }
class MatmulPrecisionGuard {
 public:
  explicit MatmulPrecisionGuard(MatmulPrecision p) : prev_(matmul_precision()) { set_matmul_precision(p); }
  ~MatmulPrecisionGuard() { set_matmul_precision(prev_); }
  MatmulPrecisionGuard(const MatmulPrecisionGuard&) = delete;
  MatmulPrecisionGuard& operator=(const MatmulPrecisionGuard&) = delete;

 private:
  MatmulPrecision prev_;
};

}  // namespace dg

// densegrad/core/device_kernels.hpp: the table through which ops reach a device backend.
// Host-only code never needs a GPU compiler: ops look a kernel up here when a tensor lives on
// a CUDA device, and the table is filled by the CUDA backend when a translation unit built by
// nvcc includes <densegrad/cuda.cuh>. A program without that TU has an empty table, and an op
// on a CUDA tensor throws "no CUDA backend in this program" instead of touching device memory.
// Declarations only: the types named here are completed by the headers that use them.
#pragma once

#include <cstdint>
#include <vector>

#include "dtype.hpp"
#include "error.hpp"
#include "shape.hpp"

namespace dg {

template <class T> class Tensor;
struct Conv2dGeometry;
namespace ref {
template <class T> struct LayerNormForward;
template <class T> struct LayerNormGrads;
}  // namespace ref

/// Pointwise functions of one tensor, with up to two constant arguments (s0, s1).
enum class UnaryFn {
  AddScalar,    // x + s0
  MulScalar,    // x * s0
  Exp, Log, Sqrt, Abs,
  PowScalar,    // x^s0, torch's conventions
  Clamp,        // min(max(x, s0), s1), NaN stays NaN
  Gelu,         // exact erf form
  GeluTanh,     // tanh approximation
  HardSigmoid,  // relu6(x + 3) / 6
  Relu, Relu6, Sigmoid,
};

/// Pointwise functions of two tensors (NumPy broadcasting), with one constant s. The *Grad
/// codes are backward formulas: (dout, saved) -> dinput, saved being what the op's backward keeps.
enum class BinaryFn {
  Add, Sub, Mul, Div, Pow,
  Eq,               // 1 where a == b else 0
  GeluGrad,         // (dout, x)
  GeluTanhGrad,     // (dout, x)
  HardSigmoidGrad,  // (dout, x)
  ReluGrad,         // (dout, y)
  Relu6Grad,        // (dout, x)
  SigmoidGrad,      // (dout, y)
  SqrtGrad,         // (dout, y)
  PowScalarGrad,    // (dout, x), exponent s
  AbsGrad,          // (dout, x)
  ClampGrad,        // (dout, x): dout where s0 <= x <= s1, else 0
  MaskedScale,      // x * mask * s (dropout)
};

/// Pointwise functions of three tensors (broadcasting).
enum class TernaryFn {
  DivGradB,  // (dout, a, b) -> -dout * a / b^2
  PowGradA,  // (dout, a, b) -> dout * b * a^(b-1), 0 where b == 0
  PowGradB,  // (dout, a, b) -> dout * a^b * log(a), 0 where a == 0 and b >= 0
};

/// The constants of one AdamW update (ops/optim compute them in double, as torch).
struct AdamWScalars {
  double decay, w1, b2, w2, neg_step_size, bc2_sqrt, eps;
  bool decoupled;
};

/// The constants of one SGD update (ops/optim cast them to the compute type, as torch).
struct SGDScalars {
  double lr, weight_decay, momentum, keep;  // keep = 1 - dampening
  bool decay, first, nesterov;              // first: the parameter's first update (buffer = g)
};

/// One device backend's kernels for element type T. Conventions, unless said otherwise:
/// inputs may have any strides, outputs are new contiguous tensors on the inputs' device, and
/// all tensors of one call are on one device (the backend checks and names the op otherwise).
template <class T>
struct DeviceKernels {
  using A = acc_t<T>;
  // ---- core: what Tensor and the tape need
  void (*fill)(const Tensor<T>& t, T value) = nullptr;
  void (*copy)(const Tensor<T>& dst, const Tensor<T>& src) = nullptr;  // src strides may be 0 (broadcast)
  void (*add_into)(const Tensor<T>& dst, const Tensor<T>& src) = nullptr;  // dst += src, one shape
  // ---- elementwise
  Tensor<T> (*unary)(UnaryFn f, const Tensor<T>& x, double s0, double s1) = nullptr;
  Tensor<T> (*binary)(BinaryFn f, const Tensor<T>& a, const Tensor<T>& b, double s0, double s1) = nullptr;
  Tensor<T> (*ternary)(TernaryFn f, const Tensor<T>& a, const Tensor<T>& b, const Tensor<T>& c) = nullptr;
  // ---- reductions over `dims` (sorted, unique); the result has the keepdim shape
  Tensor<T> (*sum)(const Tensor<T>& x, const Shape& dims) = nullptr;
  Tensor<T> (*amax)(const Tensor<T>& x, const Shape& dims) = nullptr;
  double (*sum_squares)(const Tensor<T>& x) = nullptr;  // for clip_grad_norm_
  // ---- matmul: (B, M, K) x (B, K, N) -> (B, M, N), both contiguous
  Tensor<T> (*bmm)(const Tensor<T>& a, const Tensor<T>& b) = nullptr;
  // ---- conv2d, as backend/ref/conv.hpp; weight and dout contiguous, x contiguous or batch-strided (dg::batch_stride)
  Tensor<T> (*conv2d_forward)(const Tensor<T>& x, const Tensor<T>& w, const Tensor<T>& b,
                              const Conv2dGeometry& g) = nullptr;
  Tensor<T> (*conv2d_backward_input)(const Tensor<T>& dout, const Tensor<T>& w, const Conv2dGeometry& g) = nullptr;
  Tensor<T> (*conv2d_backward_weight)(const Tensor<T>& dout, const Tensor<T>& x, const Conv2dGeometry& g) = nullptr;
  Tensor<T> (*conv2d_backward_bias)(const Tensor<T>& dout, const Conv2dGeometry& g) = nullptr;
  // ---- gelu_conv2d keeping its input in bfloat16 (T = float under bf16 products; ops/fused.hpp); h, hs, dout
  //      and dg contiguous. forward: hs <- round(h), returns conv2d(gelu(hs), w, b); backward_weight: that conv's
  //      dweight, read from hs; gelu_grad_bf16_: dg *= gelu'(hs), in place. Unset for double.
  Tensor<T> (*gelu_conv2d_bf16_forward)(const Tensor<T>& h, const Tensor<bfloat16>& hs, const Tensor<T>& w,
                                        const Tensor<T>& b, const Conv2dGeometry& g, bool tanh) = nullptr;
  Tensor<T> (*gelu_conv2d_bf16_backward_weight)(const Tensor<T>& dout, const Tensor<bfloat16>& hs,
                                                const Conv2dGeometry& g, bool tanh) = nullptr;
  void (*gelu_grad_bf16_)(const Tensor<T>& dg, const Tensor<bfloat16>& hs, bool tanh) = nullptr;
  // ---- norms, as backend/ref/norm.hpp; x, dy, weight and bias contiguous (weight/bias may be undefined)
  ref::LayerNormForward<T> (*layer_norm_forward)(const Tensor<T>& x, int64_t k, const Tensor<T>& w,
                                                 const Tensor<T>& b, double eps) = nullptr;
  ref::LayerNormGrads<T> (*layer_norm_backward)(const Tensor<T>& dy, const Tensor<T>& x, const Tensor<A>& mean,
                                                const Tensor<A>& rstd, const Tensor<T>& w, int64_t k, bool need_x,
                                                bool need_w, bool need_b) = nullptr;
  ref::LayerNormForward<T> (*layer_norm2d_forward)(const Tensor<T>& x, const Tensor<T>& w, const Tensor<T>& b,
                                                   double eps) = nullptr;
  ref::LayerNormGrads<T> (*layer_norm2d_backward)(const Tensor<T>& dy, const Tensor<T>& x, const Tensor<A>& mean,
                                                  const Tensor<A>& rstd, const Tensor<T>& w, bool need_x,
                                                  bool need_w, bool need_b) = nullptr;
  // ---- softmax / log_softmax along dim (x, y, dy contiguous)
  Tensor<T> (*softmax)(const Tensor<T>& x, int64_t dim, bool log) = nullptr;
  Tensor<T> (*softmax_backward)(const Tensor<T>& dy, const Tensor<T>& y, int64_t dim, bool log) = nullptr;
  // ---- cross-entropy on (N, C) log-probabilities and target distributions q (contiguous)
  double (*cross_entropy_mean)(const Tensor<T>& logp, const Tensor<T>& q) = nullptr;
  Tensor<T> (*cross_entropy_backward)(const Tensor<T>& logp, const Tensor<T>& q, double scale) = nullptr;
  // ---- pooling (x, dout contiguous)
  Tensor<T> (*adaptive_avg_pool2d)(const Tensor<T>& x, int64_t OH, int64_t OW) = nullptr;
  Tensor<T> (*adaptive_avg_pool2d_backward)(const Tensor<T>& dout, int64_t H, int64_t W) = nullptr;
  // ---- concat along d into out_shape
  Tensor<T> (*concat)(const std::vector<Tensor<T>>& xs, int64_t d, const Shape& out_shape) = nullptr;
  // ---- optimizer: one fused AdamW update of p in place (p, g contiguous; m, v, vmax state)
  void (*adamw_update)(const Tensor<T>& p, const Tensor<T>& g, const Tensor<A>& m, const Tensor<A>& v,
                       const Tensor<A>& vmax, const AdamWScalars& s) = nullptr;
  // ---- one fused SGD update of p in place (buf: the momentum buffer, undefined without momentum)
  void (*sgd_update)(const Tensor<T>& p, const Tensor<T>& g, const Tensor<A>& buf, const SGDScalars& s) = nullptr;
};

/// Device-wide controls of the CUDA backend (torch.cuda.*), registered with the kernels.
struct CudaRuntime {
  int (*device_count)() = nullptr;
  void (*synchronize)() = nullptr;
  size_t (*memory_allocated)() = nullptr;
  size_t (*max_memory_allocated)() = nullptr;
  void (*reset_peak_memory_stats)() = nullptr;
  void (*empty_cache)() = nullptr;
  void (*set_allow_tf32)(bool) = nullptr;
};

namespace detail {
inline CudaRuntime*& cuda_runtime_table() {
  static CudaRuntime* table = nullptr;
  return table;
}
template <class T>
DeviceKernels<T>*& cuda_kernel_table() {
  static DeviceKernels<T>* table = nullptr;
  return table;
}
}  // namespace detail

/// Installs the CUDA kernels for T (done by <densegrad/cuda.cuh>).
template <class T>
void set_cuda_kernels(DeviceKernels<T>* k) { detail::cuda_kernel_table<T>() = k; }

/// True when this program has CUDA kernels for T.
template <class T>
bool has_cuda_kernels() { return detail::cuda_kernel_table<T>() != nullptr; }

/// The CUDA kernels for T; throws naming `op` when this program has none.
template <class T>
const DeviceKernels<T>& cuda_kernels(const char* op) {
  const DeviceKernels<T>* k = detail::cuda_kernel_table<T>();
  DG_CHECK(k != nullptr, op, ": the tensor is on a CUDA device, but this program has no CUDA kernels for ",
           dtype_name(dtype_of<T>()), " (include <densegrad/cuda.cuh> in a .cu file built by nvcc)");
  return *k;
}

/// Installs the CUDA runtime controls (done by <densegrad/cuda.cuh>).
inline void set_cuda_runtime(CudaRuntime* r) { detail::cuda_runtime_table() = r; }

// ---- torch.cuda.* for any translation unit; without the CUDA backend: no devices, zero bytes.

/// True when the program has the CUDA backend and a GPU (torch.cuda.is_available).
inline bool cuda_is_available() {
  const CudaRuntime* r = detail::cuda_runtime_table();
  return r && r->device_count() > 0;
}
/// Waits for all queued GPU work (torch.cuda.synchronize); nothing to wait for without CUDA.
inline void cuda_synchronize() {
  if (const CudaRuntime* r = detail::cuda_runtime_table()) r->synchronize();
}
/// Bytes of GPU memory held by tensors now, and the peak since the last reset.
inline size_t cuda_memory_allocated() {
  const CudaRuntime* r = detail::cuda_runtime_table();
  return r ? r->memory_allocated() : 0;
}
inline size_t cuda_max_memory_allocated() {
  const CudaRuntime* r = detail::cuda_runtime_table();
  return r ? r->max_memory_allocated() : 0;
}
inline void cuda_reset_peak_memory_stats() {
  if (const CudaRuntime* r = detail::cuda_runtime_table()) r->reset_peak_memory_stats();
}
/// Frees the GPU blocks the caching allocator keeps for reuse (torch.cuda.empty_cache).
inline void cuda_empty_cache() {
  if (const CudaRuntime* r = detail::cuda_runtime_table()) r->empty_cache();
}
/// Lets float matrix products use TF32 tensor cores (torch.backends.cuda.matmul.allow_tf32).
inline void cuda_set_allow_tf32(bool on) {
  const CudaRuntime* r = detail::cuda_runtime_table();
  DG_CHECK(r != nullptr || !on, "cuda_set_allow_tf32: this program has no CUDA backend");
  if (r) r->set_allow_tf32(on);
}

}  // namespace dg

// densegrad/backend/cuda/matmul.cuh: row-major (strided-batched) GEMM through cuBLAS, the
// batched matrix product built on it, and its entry in the kernel table. float and double only;
// float uses TF32 tensor cores only when allow_tf32() is set (off by default, so results match
// the CPU kernels to float rounding). A float GEMM may also take bfloat16 operands with float
// sums and a float result (the conv kernels' dg::MatmulPrecision::bf16 path). Not a
// hand-written GEMM.
// Shape legend: a: (B, M, K), b: (B, K, N), out: (B, M, N).
#pragma once

#include <algorithm>
#include <climits>
#include <type_traits>

#include <cuda_bf16.h>

#include "common.cuh"

namespace dg::cuda {

/// The operand element type of bf16 products on the GPU (2 bytes, the bits of dg::bfloat16).
using bf16_t = __nv_bfloat16;

/// Whether float GEMMs may round their inputs to TF32 on tensor cores (torch's
/// torch.backends.cuda.matmul.allow_tf32); false by default. double is never affected.
inline bool& allow_tf32() {
  static bool allow = false;
  return allow;
}

/// C[i] = alpha * op(A[i]) @ op(B[i]) + beta * C[i] for i in [0, batch), all ROW-major:
/// op(A) is (M, K), op(B) is (K, N), C is (M, N); lda/ldb/ldc are the row lengths of A, B, C
/// as stored (so A stored (K, M) when trans_a), and stride_* the element distance between
/// consecutive matrices of the batch (0 reuses one matrix for every i). beta = 1 accumulates
/// into C, beta = 0 overwrites it (C need not be initialized then).
///
/// cuBLAS is column-major. A row-major (R, S) matrix with row length ld is, read column-major,
/// its transpose (S, R) with leading dimension ld. So the row-major product C = op(A) op(B) is
/// handed to cuBLAS as the column-major product C^T = op(B)^T op(A)^T: swap the operands, swap
/// M and N, and keep each operand's transpose flag (the stored-as-transpose view already
/// supplies the ^T). No data moves.
///
/// In = bf16_t (T = float only): A and B hold bfloat16 values; cuBLAS multiplies them exactly and
/// sums in float (CUBLAS_COMPUTE_32F) into the float C. TF32 does not apply there.
template <class T, class In = T>
void gemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, T alpha, const In* A, int64_t lda,
          int64_t stride_a, const In* B, int64_t ldb, int64_t stride_b, T beta, T* C, int64_t ldc, int64_t stride_c,
          int64_t batch) {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, double>, "cuda::gemm: float and double only");
  constexpr bool bf16_in = std::is_same_v<In, bf16_t>;
  static_assert(std::is_same_v<In, T> || (bf16_in && std::is_same_v<T, float>),
                "cuda::gemm: operands of the result's type, or bfloat16 operands for a float result");
  if (M == 0 || N == 0 || batch == 0) return;
  DG_CHECK(M <= INT_MAX && N <= INT_MAX && K <= INT_MAX && lda <= INT_MAX && ldb <= INT_MAX && ldc <= INT_MAX,
           "gemm: cuBLAS takes int sizes, got M=", M, " N=", N, " K=", K);
  cublasHandle_t h = cublas();
  constexpr bool is_float = std::is_same_v<T, float>;
  const bool tf32 = is_float && !bf16_in && allow_tf32();
  // set on every call: the handle is shared, and the compute type alone must decide
  DG_CUBLAS_CHECK(cublas_api().set_math_mode(h, tf32 ? CUBLAS_TF32_TENSOR_OP_MATH : CUBLAS_DEFAULT_MATH));
  const cudaDataType_t dt = is_float ? CUDA_R_32F : CUDA_R_64F;
  const cudaDataType_t dt_in = bf16_in ? CUDA_R_16BF : dt;
  const cublasComputeType_t ct = !is_float ? CUBLAS_COMPUTE_64F : tf32 ? CUBLAS_COMPUTE_32F_FAST_TF32 : CUBLAS_COMPUTE_32F;
  const cublasOperation_t op_a = trans_a ? CUBLAS_OP_T : CUBLAS_OP_N, op_b = trans_b ? CUBLAS_OP_T : CUBLAS_OP_N;
  // cuBLAS wants ld >= 1 even for empty operands (K = 0)
  const int ia = static_cast<int>(std::max<int64_t>(lda, 1)), ib = static_cast<int>(std::max<int64_t>(ldb, 1)),
            ic = static_cast<int>(std::max<int64_t>(ldc, 1));
  constexpr int64_t kMaxBatch = 65535;  // one call's batch stays within every cuBLAS grid limit
  for (int64_t i0 = 0; i0 < batch; i0 += kMaxBatch) {
    const int64_t nb = std::min(kMaxBatch, batch - i0);
    // column-major: C^T (N, M) = op(B)^T (N, K) @ op(A)^T (K, M)
    DG_CUBLAS_CHECK(cublas_api().gemm_strided_batched_ex(
        h, op_b, op_a, static_cast<int>(N), static_cast<int>(M), static_cast<int>(K), &alpha, B + i0 * stride_b, dt_in,
        ib, stride_b, A + i0 * stride_a, dt_in, ia, stride_a, &beta, C + i0 * stride_c, dt, ic, stride_c,
        static_cast<int>(nb), ct, CUBLAS_GEMM_DEFAULT));
  }
}

/// out[b] = a[b] @ c[b] (torch.bmm); a: (B, M, K), c: (B, K, N), both contiguous on one CUDA
/// device; out: (B, M, N) on that device. Example: `auto y = dg::cuda::bmm(a, c);`
template <class T>
Tensor<T> bmm(const Tensor<T>& a, const Tensor<T>& c) {
  DG_CHECK(a.dim() == 3 && c.dim() == 3 && a.shape()[0] == c.shape()[0] && a.shape()[2] == c.shape()[1],
           "bmm: expected (B, M, K) and (B, K, N), got ", shape_str(a.shape()), " and ", shape_str(c.shape()));
  DG_CHECK(a.is_contiguous() && c.is_contiguous(), "bmm: the CUDA kernel expects contiguous operands");
  const Device dev = a.device();
  DG_CHECK(dev.is_cuda(), "bmm: expected CUDA tensors, got one on ", dev.str());
  check_device<T>("bmm", dev, {&a, &c});
  const int64_t B = a.shape()[0], M = a.shape()[1], K = a.shape()[2], N = c.shape()[2];
  Tensor<T> out = empty<T>({B, M, N}, dev);
  if (out.numel() == 0) return out;
  if (K == 0) {  // an empty sum: zeros (not left to cuBLAS's k = 0 conventions)
    DG_CUDA_CHECK(cudaMemsetAsync(out.data(), 0, static_cast<size_t>(out.numel()) * sizeof(T), stream()));
    return out;
  }
  gemm<T>(false, false, M, N, K, T(1), a.data(), K, M * K, c.data(), N, K * N, T(0), out.data(), N, M * N, B);
  return out;
}

/// Installs bmm in the table.
template <class T>
void register_matmul(DeviceKernels<T>& k) {
  k.bmm = DG_CUDA_ON_DEVICE(bmm<T>);
}

}  // namespace dg::cuda

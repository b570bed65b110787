// densegrad/ops/matmul.hpp: matmul with torch.matmul's rules (1-D, 2-D, batched with
// broadcast batch dims). One recorded op, bmm; the rest are views whose gradients flow
// through expand (sum over broadcast batches) and reshape.
// Shape legend: a: (..., M, K), b: (..., K, N) -> (..., M, N).
#pragma once

#include "../backend/cpu/matmul.hpp"
#include "../backend/ref/matmul.hpp"
#include "dispatch.hpp"
#include "shape.hpp"

namespace dg {

/// Batched product of contiguous (B, M, K) and (B, K, N). Eigen GEMM for every dtype.
template <class T>
Tensor<T> bmm(const Tensor<T>& a, const Tensor<T>& b) {
  DG_CHECK(a.dim() == 3 && b.dim() == 3 && a.shape()[0] == b.shape()[0] && a.shape()[2] == b.shape()[1],
           "bmm: expected (B, M, K) and (B, K, N), got ", shape_str(a.shape()), " and ", shape_str(b.shape()));
  Tensor<T> ac, bc;
  {
    NoGradGuard g;  // the copies are internal: record nothing for them, bmm's node covers a and b
    ac = contiguous(a).detach();
    bc = contiguous(b).detach();
  }
  // cuBLAS on CUDA; Eigen GEMM on the CPU (ref::bmm is the oracle both are tested against)
  Tensor<T> out = detail::same_device<T>("bmm", {&ac, &bc}).is_cuda() ? cuda_kernels<T>("bmm").bmm(ac, bc)
                                                                     : cpu::bmm(ac, bc);
  // saves only the operands backward needs: dA = dout @ B^T needs B, dB = A^T @ dout needs A
  const bool need_a = a.requires_grad(), need_b = b.requires_grad();
  return autograd::record("bmm", out, {a, b}, [ac = need_b ? ac : Tensor<T>(), bc = need_a ? bc : Tensor<T>(),
                                               need_a, need_b](const Tensor<T>& dout) {
    std::vector<Tensor<T>> g(2);
    if (need_a) g[0] = bmm(dout, transpose(bc, 1, 2));
    if (need_b) g[1] = bmm(transpose(ac, 1, 2), dout);
    return g;
  });
}

/// torch.matmul(a, b).
template <class T>
Tensor<T> matmul(const Tensor<T>& a, const Tensor<T>& b) {
  DG_CHECK(a.dim() >= 1 && b.dim() >= 1, "matmul: both arguments need at least 1 dim, got shapes ",
           shape_str(a.shape()), " and ", shape_str(b.shape()));
  if (detail::same_device<T>("matmul", {&a, &b}).is_cuda()) cuda_kernels<T>("matmul");  // errors name matmul
  // 1-D operands become matrices (a row, b a column) and lose that dim at the end
  Tensor<T> a2 = a.dim() == 1 ? unsqueeze(a, 0) : a, b2 = b.dim() == 1 ? unsqueeze(b, 1) : b;
  const int64_t M = a2.size(-2), K = a2.size(-1), K2 = b2.size(-2), N = b2.size(-1);
  DG_CHECK(K == K2, "matmul: inner dimensions differ: ", shape_str(a.shape()), " @ ", shape_str(b.shape()), " (", K,
           " vs ", K2, ")");
  Shape ba(a2.shape().begin(), a2.shape().end() - 2), bb(b2.shape().begin(), b2.shape().end() - 2);
  Shape batch = broadcast_shapes(ba, bb, "matmul (batch dims)");
  int64_t B = shape_numel(batch);
  Shape ea = batch, eb = batch;
  ea.insert(ea.end(), {M, K});
  eb.insert(eb.end(), {K, N});
  Tensor<T> out = bmm(reshape(expand(a2, ea), {B, M, K}), reshape(expand(b2, eb), {B, K, N}));
  Shape os = batch;
  if (a.dim() > 1) os.push_back(M);
  if (b.dim() > 1) os.push_back(N);
  return reshape(out, os);
}

template <class T> Tensor<T> Tensor<T>::matmul(const Tensor& other) const { return dg::matmul(*this, other); }

}  // namespace dg

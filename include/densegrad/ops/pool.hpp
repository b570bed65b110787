// densegrad/ops/pool.hpp: adaptive_avg_pool2d (torch's bins), the pooling RDNet's head needs.
// Deliberately not here: max pooling and fixed-kernel avg_pool2d (RDNet's stem and
// transitions downsample with strided convs).
// Shape legend: x: (N, C, H, W) or (C, H, W) -> (N, C, OH, OW) or (C, OH, OW).
#pragma once

#include "../backend/ref/pool.hpp"
#include "elementwise.hpp"
#include "reduce.hpp"
#include "shape.hpp"

namespace dg {

/// torch.nn.functional.adaptive_avg_pool2d(x, (oh, ow)): output cell (i, j) is the mean of
/// input rows [floor(i*H/oh), ceil((i+1)*H/oh)) and the matching columns.
/// Example: auto feat = dg::adaptive_avg_pool2d(x, 1, 1).flatten(1);  // (N, C)
template <class T>
Tensor<T> adaptive_avg_pool2d(const Tensor<T>& x, int64_t oh, int64_t ow) {
  DG_CHECK(x.dim() == 3 || x.dim() == 4, "adaptive_avg_pool2d: expected a (N, C, H, W) or (C, H, W) input, got shape ",
           shape_str(x.shape()));
  if (x.dim() == 3) return squeeze(adaptive_avg_pool2d(unsqueeze(x, 0), oh, ow), 0);
  DG_CHECK(oh > 0 && ow > 0, "adaptive_avg_pool2d: output size must be positive, got (", oh, ", ", ow, ")");
  const int64_t H = x.size(2), W = x.size(3);
  DG_CHECK(H > 0 && W > 0, "adaptive_avg_pool2d: input spatial size must be non-empty, got shape ",
           shape_str(x.shape()));
  // (1, 1) is a global mean: one reduction, and its backward is a broadcast
  if (oh == 1 && ow == 1) return mean(x, {2, 3}, true);
  const bool cuda = x.device().is_cuda();
  Tensor<T> out = cuda ? cuda_kernels<T>("adaptive_avg_pool2d").adaptive_avg_pool2d(contiguous(x.detach()), oh, ow)
                       : ref::adaptive_avg_pool2d(x, oh, ow);  // the CPU's only path is the ref kernel
  // saves nothing but the input's spatial size: the bins are a function of (H, W, OH, OW)
  return autograd::record("adaptive_avg_pool2d", out, {x}, [H, W, cuda](const Tensor<T>& dout) {
    if (cuda)
      return std::vector<Tensor<T>>{
          cuda_kernels<T>("adaptive_avg_pool2d backward").adaptive_avg_pool2d_backward(contiguous(dout), H, W)};
    return std::vector<Tensor<T>>{ref::adaptive_avg_pool2d_backward(dout, H, W)};
  });
}

/// adaptive_avg_pool2d(x, size): square output (torch's int output_size).
template <class T>
Tensor<T> adaptive_avg_pool2d(const Tensor<T>& x, int64_t size) {
  return adaptive_avg_pool2d(x, size, size);
}

}  // namespace dg

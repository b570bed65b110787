// densegrad/backend/cuda/concat.cuh: concatenation along a dim: each input is copied into its
// slice of the output by the strided copy kernel (one launch per input; a 2-D copy for the
// contiguous case, where a slice of dim d is a run of rows).
#pragma once

#include "common.cuh"
#include "elementwise.cuh"

namespace dg::cuda {

/// The view of `t` covering [start, start + length) of dim d (no autograd; a kernel's helper).
template <class T>
Tensor<T> slice_view(const Tensor<T>& t, int64_t d, int64_t start, int64_t length) {
  auto impl = std::make_shared<TensorImpl<T>>();
  impl->storage = t.storage();
  impl->shape = t.shape();
  impl->shape[d] = length;
  impl->strides = t.strides();
  impl->offset = t.impl()->offset + start * t.strides()[d];
  return Tensor<T>(impl);
}

/// torch.cat(xs, d) into a new tensor of out_shape.
template <class T>
Tensor<T> concat(const std::vector<Tensor<T>>& xs, int64_t d, const Shape& out_shape) {
  Tensor<T> out = empty<T>(out_shape, xs.front().device());
  int64_t at = 0;
  for (const Tensor<T>& x : xs) {
    check_device<T>("concat", out.device(), {&x});
    const int64_t len = x.size(d);
    if (len > 0 && x.numel() > 0) {
      Tensor<T> dst = slice_view(out, d, at, len);
      const int64_t rows = shape_numel(Shape(out_shape.begin(), out_shape.begin() + d));
      const int64_t inner = x.numel() / std::max<int64_t>(rows, 1);  // elements per row of x
      if (x.is_contiguous() && rows > 0) {  // rows of `inner` elements, pitch = out's row
        const int64_t out_row = out.numel() / rows;
        DG_CUDA_CHECK(cudaMemcpy2DAsync(dst.data(), size_t(out_row) * sizeof(T), x.data(), size_t(inner) * sizeof(T),
                                        size_t(inner) * sizeof(T), size_t(rows), cudaMemcpyDeviceToDevice, stream()));
      } else {
        copy(dst, x);
      }
    }
    at += len;
  }
  return out;
}

template <class T>
void register_concat(DeviceKernels<T>& k) { k.concat = DG_CUDA_ON_DEVICE(concat<T>); }

}  // namespace dg::cuda

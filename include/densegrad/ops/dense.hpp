// densegrad/ops/dense.hpp: DenseBuffer, zero-copy dense connectivity (Pleiss et al. 2017,
// "Memory-Efficient Implementation of DenseNets"). A dense stage allocates one buffer for all
// the channels it will have; each append() copies only the new channels into the next slice
// and returns every channel so far as a view of the buffer. It replaces the naive
// concat(features, 1) per block (ops/concat.hpp), which copies all channels so far again for
// every block: quadratic memory and traffic in the number of blocks, against linear here.
// Not a general concat: NCHW, along channels (dim 1), filled front to back, once.
// Shape legend: buffer (N, C_total, H, W); x: (N, C_x, H, W); prefix: (N, C_so_far, H, W)
// with strides (C_total*H*W, H*W, W, 1), a "batch-strided" view (cpu::batch_stride) that the
// conv2d and layer_norm2d CPU kernels read in place.
//
// Why handing out views of a buffer that is written afterwards is correct:
// - Each append writes only channels [C_prev, C_prev + C_x), which no prefix returned before it
//   contains, and no channel is written twice. So a prefix's values never change once it is
//   returned, and whatever an op saved from it for backward (conv2d saves its input) still holds
//   what that op read in forward. Later prefixes contain earlier ones; only later channels are new.
// - A stage makes a new buffer per forward: the graph of an earlier forward, not yet
//   backpropagated, keeps reading its own buffer, never one that is being refilled.
// - Gradients: prefix_k is [prefix_{k-1}, x_k] along channels, so its backward hands
//   dout[:, :C_prev] to prefix_{k-1} and dout[:, C_prev:] to x_k, both views of dout, nothing
//   copied (concat's rule). The tape sums what reaches prefix_{k-1} from the block that read it
//   and from prefix_k: in a dense stage every feature map feeds every later block.
#pragma once

#include <algorithm>

#include "../autograd/tape.hpp"
#include "shape.hpp"

namespace dg {

/// One preallocated (N, C_total, H, W) feature buffer of a dense stage, filled by append().
/// Make a new one per forward. Example (a dense stage, blocks reading every feature so far):
///   dg::DenseBuffer<float> features(x, x.size(1) + num_blocks * growth_rate);
///   Tensor<float> h = features.append(x);                       // (N, C_in, H, W)
///   for (auto& block : blocks) h = features.append(block(h));    // (N, C_in + (i+1)*G, H, W)
template <class T>
class DenseBuffer {
 public:
  /// An unfilled buffer of `channels` channels, with like's batch size, H, W and device.
  DenseBuffer(const Tensor<T>& like, int64_t channels) {
    DG_CHECK(like.defined() && like.dim() == 4, "DenseBuffer: expected an (N, C, H, W) tensor to take N, H, W from, got ",
             like.defined() ? shape_str(like.shape()) : std::string("an undefined tensor"));
    DG_CHECK(channels >= 0, "DenseBuffer: channels must be non-negative, got ", channels);
    buffer_ = Tensor<T>::empty({like.size(0), channels, like.size(2), like.size(3)}, like.device());
  }

  /// Copies x's channels after those appended so far and returns all channels so far,
  /// (N, C_so_far, H, W), as a view of the buffer. Differentiable in x and in the previous
  /// prefix (whose gradients are windows of this one's).
  Tensor<T> append(const Tensor<T>& x) {
    const Shape& b = buffer_.shape();
    DG_CHECK(x.defined() && x.dim() == 4 && x.size(0) == b[0] && x.size(2) == b[2] && x.size(3) == b[3],
             "DenseBuffer::append: expected x of shape (", b[0], ", C, ", b[2], ", ", b[3], "), got ",
             x.defined() ? shape_str(x.shape()) : std::string("an undefined tensor"));
    DG_CHECK(x.device() == buffer_.device(), "DenseBuffer::append: x is on ", x.device().str(), ", the buffer on ",
             buffer_.device().str());
    const int64_t c_prev = filled_, c_x = x.size(1);
    DG_CHECK(c_prev + c_x <= b[1], "DenseBuffer::append: ", c_x, " more channels do not fit: ", c_prev, " of ", b[1],
             " are filled (x ", shape_str(x.shape()), ")");
    write_channels(x, c_prev);
    filled_ = c_prev + c_x;
    // The prefix: a fresh handle on the buffer's first filled_ channels. The buffer's own strides
    // make it batch-strided (images C_total*H*W apart).
    Tensor<T> out = Tensor<T>::from_storage(buffer_.storage(), {b[0], filled_, b[2], b[3]}, buffer_.strides(),
                                            buffer_.offset());
    std::vector<Tensor<T>> inputs{prefix_, x};  // prefix_ is undefined at the first append: no edge
    // Saves only where x sits: the gradients are windows of dout (see the file comment).
    prefix_ = autograd::record("dense_append", out, std::move(inputs), [c_prev, c_x](const Tensor<T>& dout) {
      return std::vector<Tensor<T>>{c_prev > 0 ? narrow(dout, 1, 0, c_prev) : Tensor<T>(), narrow(dout, 1, c_prev, c_x)};
    });
    return prefix_;
  }

  /// Channels filled so far (C_so_far).
  int64_t filled() const { return filled_; }
  /// Channels the buffer holds (C_total).
  int64_t channels() const { return buffer_.size(1); }

 private:
  /// buffer[:, c0 : c0 + C_x] = x, outside autograd (append's node is the op the graph sees).
  /// Contiguous x on the CPU: one copy per image (images split across the OpenMP threads when
  /// there is enough to copy); anything else goes through copy_.
  void write_channels(const Tensor<T>& x, int64_t c0) {
    const int64_t n = x.size(0), image = x.size(1) * x.size(2) * x.size(3), plane = x.size(2) * x.size(3);
    if (x.device().is_cpu() && x.is_contiguous()) {
      const T* src = x.data();
      T* dst = buffer_.data() + c0 * plane;
      const int64_t dst_image = buffer_.size(1) * plane;
      DENSEGRAD_OMP(parallel for schedule(static) if (n > 1 && n * image >= autograd::detail::kParallelAccumulate))
      for (int64_t i = 0; i < n; ++i) std::copy(src + i * image, src + (i + 1) * image, dst + i * dst_image);
      return;
    }
    NoGradGuard no_grad;
    Tensor<T> window = Tensor<T>::from_storage(buffer_.storage(), x.shape(), buffer_.strides(),
                                               buffer_.offset() + c0 * buffer_.stride(1));
    window.copy_(x);
  }

  Tensor<T> buffer_;   // (N, C_total, H, W), contiguous; never exposed: only prefix views are
  Tensor<T> prefix_;   // the last prefix returned (the previous one for the next append's edge)
  int64_t filled_ = 0;
};

}  // namespace dg

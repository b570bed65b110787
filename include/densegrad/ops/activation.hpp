// densegrad/ops/activation.hpp: activations with their backward: gelu (erf or tanh form),
// hard_sigmoid, relu, relu6, sigmoid, softmax, log_softmax (torch.nn.functional semantics,
// including torch's gradient at the kinks). gelu runs the fast CPU path; the rest run the ref
// kernels of backend/ref/activation.hpp. Not in-place variants, not fused bias+activation.
// Shape legend: x: any shape; the output and every gradient have x's shape.
#pragma once

#include "../autograd/tape.hpp"
#include "../backend/cpu/activation.hpp"
#include "../backend/ref/activation.hpp"
#include "dispatch.hpp"
#include "shape.hpp"

namespace dg {

namespace detail {
/// gelu of a contiguous x without recording: the fast CPU path (backend/cpu/activation.hpp:
/// vectorized chunks on OpenMP threads; ref::gelu is its oracle) or the CUDA kernel.
template <class T>
Tensor<T> gelu_forward(const Tensor<T>& xc, bool tanh_approximation) {
  if (xc.device().is_cuda())
    return cuda_kernels<T>("gelu").unary(tanh_approximation ? UnaryFn::GeluTanh : UnaryFn::Gelu, xc, 0, 0);
  return cpu::gelu(xc, tanh_approximation);
}
/// dx = dout * gelu'(x) for the contiguous input xc.
template <class T>
Tensor<T> gelu_grad(const Tensor<T>& dout, const Tensor<T>& xc, bool tanh_approximation) {
  if (xc.device().is_cuda())
    return cuda_kernels<T>("gelu backward")
        .binary(tanh_approximation ? BinaryFn::GeluTanhGrad : BinaryFn::GeluGrad, dout, xc, 0, 0);
  return cpu::gelu_backward(contiguous(dout), xc, tanh_approximation);
}
}  // namespace detail

/// torch.nn.functional.gelu(x, approximate="none") = x * Phi(x) with the exact erf, or with
/// tanh_approximation = true, approximate="tanh". Example: auto y = dg::gelu(x);
template <class T>
Tensor<T> gelu(const Tensor<T>& x, bool tanh_approximation = false) {
  Tensor<T> xc = contiguous(x.detach());
  Tensor<T> out = detail::gelu_forward(xc, tanh_approximation);
  // saves the input: gelu'(x) = Phi(x) + x phi(x) needs x, not the output
  return autograd::record("gelu", out, {x}, [xc, tanh_approximation](const Tensor<T>& dout) {
    return std::vector<Tensor<T>>{detail::gelu_grad(dout, xc, tanh_approximation)};
  });
}

/// torch.nn.functional.hardsigmoid: relu6(x + 3) / 6. The gradient is 1/6 strictly inside
/// (-3, 3) and 0 elsewhere, also at exactly -3 and 3 (as torch). Saves x.
template <class T>
Tensor<T> hard_sigmoid(const Tensor<T>& x) {
  Tensor<T> out = x.device().is_cuda() ? cuda_kernels<T>("hard_sigmoid").unary(UnaryFn::HardSigmoid, x, 0, 0) : ref::hard_sigmoid(x);
  return autograd::record("hard_sigmoid", out, {x}, [x = x.detach()](const Tensor<T>& dout) {
    if (dout.device().is_cuda())
      return std::vector<Tensor<T>>{cuda_kernels<T>("hard_sigmoid backward").binary(BinaryFn::HardSigmoidGrad, dout, x, 0, 0)};
    return std::vector<Tensor<T>>{ref::hard_sigmoid_backward(dout, x)};
  });
}

/// torch.relu: max(x, 0); the gradient at x == 0 is 0. Saves the output (y > 0 iff x > 0), as torch does.
template <class T>
Tensor<T> relu(const Tensor<T>& x) {
  Tensor<T> out = x.device().is_cuda() ? cuda_kernels<T>("relu").unary(UnaryFn::Relu, x, 0, 0) : ref::relu(x);
  return autograd::record("relu", out, {x}, [y = out.detach()](const Tensor<T>& dout) {
    if (dout.device().is_cuda())
      return std::vector<Tensor<T>>{cuda_kernels<T>("relu backward").binary(BinaryFn::ReluGrad, dout, y, 0, 0)};
    return std::vector<Tensor<T>>{ref::relu_backward(dout, y)};
  });
}

/// torch.nn.functional.relu6: min(max(x, 0), 6); the gradient passes strictly inside (0, 6). Saves x.
template <class T>
Tensor<T> relu6(const Tensor<T>& x) {
  Tensor<T> out = x.device().is_cuda() ? cuda_kernels<T>("relu6").unary(UnaryFn::Relu6, x, 0, 0) : ref::relu6(x);
  return autograd::record("relu6", out, {x}, [x = x.detach()](const Tensor<T>& dout) {
    if (dout.device().is_cuda())
      return std::vector<Tensor<T>>{cuda_kernels<T>("relu6 backward").binary(BinaryFn::Relu6Grad, dout, x, 0, 0)};
    return std::vector<Tensor<T>>{ref::relu6_backward(dout, x)};
  });
}

/// torch.sigmoid: 1 / (1 + exp(-x)). Saves the output: sigmoid' = y (1 - y).
template <class T>
Tensor<T> sigmoid(const Tensor<T>& x) {
  Tensor<T> out = x.device().is_cuda() ? cuda_kernels<T>("sigmoid").unary(UnaryFn::Sigmoid, x, 0, 0) : ref::sigmoid(x);
  return autograd::record("sigmoid", out, {x}, [y = out.detach()](const Tensor<T>& dout) {
    if (dout.device().is_cuda())
      return std::vector<Tensor<T>>{cuda_kernels<T>("sigmoid backward").binary(BinaryFn::SigmoidGrad, dout, y, 0, 0)};
    return std::vector<Tensor<T>>{ref::sigmoid_backward(dout, y)};
  });
}

/// torch.softmax(x, dim): exp(x - max) / sum(exp(x - max)) along dim (negative dims count from
/// the end). Saves the output: dx = y * (dy - sum(dy * y, dim)).
template <class T>
Tensor<T> softmax(const Tensor<T>& x, int64_t dim) {
  const int64_t d = wrap_dim(dim, x.dim(), "softmax");
  Tensor<T> out = x.device().is_cuda() ? cuda_kernels<T>("softmax").softmax(contiguous(x.detach()), d, false)
                                      : ref::softmax(x, d);
  return autograd::record("softmax", out, {x}, [y = out.detach(), d](const Tensor<T>& dout) {
    if (y.device().is_cuda())
      return std::vector<Tensor<T>>{cuda_kernels<T>("softmax backward").softmax_backward(contiguous(dout), y, d, false)};
    return std::vector<Tensor<T>>{ref::softmax_backward(dout, y, d, false)};
  });
}

/// torch.log_softmax(x, dim): x - max - log(sum(exp(x - max))) along dim, stable for any magnitude.
/// Saves the output: dx = dy - exp(y) * sum(dy, dim).
template <class T>
Tensor<T> log_softmax(const Tensor<T>& x, int64_t dim) {
  const int64_t d = wrap_dim(dim, x.dim(), "log_softmax");
  Tensor<T> out = x.device().is_cuda() ? cuda_kernels<T>("log_softmax").softmax(contiguous(x.detach()), d, true)
                                      : ref::log_softmax(x, d);
  return autograd::record("log_softmax", out, {x}, [y = out.detach(), d](const Tensor<T>& dout) {
    if (y.device().is_cuda())
      return std::vector<Tensor<T>>{cuda_kernels<T>("log_softmax backward").softmax_backward(contiguous(dout), y, d, true)};
    return std::vector<Tensor<T>>{ref::softmax_backward(dout, y, d, true)};
  });
}

}  // namespace dg

// densegrad/ops/loss.hpp: cross_entropy (torch F.cross_entropy, mean reduction) with class-index
// or soft (probability) targets and label smoothing. Not here: class weights, ignore_index,
// other reductions, spatial (N, C, d...) logits.
// Shape legend: logits: (N, C); target: (N) class indices or (N, C) probabilities -> 0-D loss.
#pragma once

#include "../backend/ref/loss.hpp"
#include "elementwise.hpp"

namespace dg {

namespace detail {
/// The loss against a dense per-sample target distribution q (N, C), recorded as one op.
/// `soft` is the user's soft target when it may need a gradient, else undefined.
/// Saves log_softmax(logits) and q: d/dlogits = (softmax * sum q - q) / N needs both, and
/// d/dsoft = -(1 - eps) * logp / N needs logp.
template <class T>
Tensor<T> cross_entropy_dense(const Tensor<T>& logits, const Tensor<T>& q, double eps, const Tensor<T>& soft) {
  const bool cuda = same_device<T>("cross_entropy", {&logits, &q}).is_cuda();
  Tensor<T> logp, out;
  if (cuda) {  // the loss value comes back to the host (one scalar) and goes out as a device tensor
    const DeviceKernels<T>& k = cuda_kernels<T>("cross_entropy");
    logp = k.softmax(contiguous(logits.detach()), 1, true);
    out = full<T>({}, T(k.cross_entropy_mean(logp, q)), logits.device());
  } else {
    logp = ref::log_softmax_rows(logits);
    out = scalar_tensor<T>(T(ref::cross_entropy_mean(logp, q)));
  }
  std::vector<Tensor<T>> inputs{logits};
  if (soft.defined()) inputs.push_back(soft);
  const bool need_logits = logits.requires_grad(), need_soft = soft.requires_grad();
  const double N = double(logits.size(0));
  return autograd::record("cross_entropy", out, inputs, [logp, q, eps, N, need_logits, need_soft,
                                                         n_in = inputs.size()](const Tensor<T>& dout) {
    const double g = double(acc_t<T>(dout.item())) / N;
    std::vector<Tensor<T>> grads(n_in);
    if (need_logits)
      grads[0] = logp.device().is_cuda() ? cuda_kernels<T>("cross_entropy backward").cross_entropy_backward(logp, q, g)
                                         : ref::cross_entropy_backward(logp, q, g);
    const double s = -(1.0 - eps) * g;
    if (need_soft)
      grads[1] = pointwise("cross_entropy backward", logp, UnaryFn::MulScalar,
                           [s](auto v) { return v * decltype(v)(s); }, s);
    return grads;
  });
}

inline void check_label_smoothing(double eps) {
  DG_CHECK(eps >= 0.0 && eps <= 1.0, "cross_entropy: label_smoothing must be between 0.0 and 1.0, got ", eps);
}
}  // namespace detail

/// torch.nn.functional.cross_entropy(logits, target, label_smoothing=eps) with class indices:
/// mean over samples of (1 - eps) * -log p[target] + eps * mean_c(-log p[c]).
/// Example: auto loss = dg::cross_entropy(model.forward(x), labels, 0.1); loss.backward();
template <class T>
Tensor<T> cross_entropy(const Tensor<T>& logits, const Tensor<int64_t>& target, double label_smoothing = 0.0) {
  detail::check_label_smoothing(label_smoothing);
  DG_CHECK(logits.dim() == 2, "cross_entropy: expected logits of shape (N, C), got ", shape_str(logits.shape()));
  const int64_t N = logits.size(0), C = logits.size(1);
  DG_CHECK(target.dim() == 1 && target.size(0) == N, "cross_entropy: class-index target must have shape (N) = [", N,
           "] for logits ", shape_str(logits.shape()), ", got ", shape_str(target.shape()));
  // the target as a distribution: eps/C everywhere plus (1 - eps) on the labelled class
  Tensor<T> q = full<T>({N, C}, T(label_smoothing / double(C)));
  const std::vector<int64_t> labels = target.to_vector();
  for (int64_t n = 0; n < N; ++n) {
    const int64_t y = labels[static_cast<size_t>(n)];
    DG_CHECK(y >= 0 && y < C, "cross_entropy: target ", y, " of sample ", n, " is out of range for ", C,
             " classes (expected 0 <= target < ", C, ")");
    q.data()[n * C + y] = T(label_smoothing / double(C) + (1.0 - label_smoothing));
  }
  return detail::cross_entropy_dense(logits, q.to(logits.device()), label_smoothing, Tensor<T>());
}

/// torch.nn.functional.cross_entropy(logits, soft_target, label_smoothing=eps) with class
/// probabilities: the target becomes soft_target * (1 - eps) + eps / C (torch's rule), then
/// mean over samples of -sum_c target[c] * log p[c]. Differentiable in soft_target, as in torch.
/// Example: auto loss = dg::cross_entropy(logits, mixup_targets);
template <class T>
Tensor<T> cross_entropy(const Tensor<T>& logits, const Tensor<T>& soft_target, double label_smoothing = 0.0) {
  detail::check_label_smoothing(label_smoothing);
  DG_CHECK(logits.dim() == 2, "cross_entropy: expected logits of shape (N, C), got ", shape_str(logits.shape()));
  DG_CHECK(soft_target.shape() == logits.shape(), "cross_entropy: soft target must have the logits' shape ",
           shape_str(logits.shape()), ", got ", shape_str(soft_target.shape()));
  const double C = double(logits.size(1)), eps = label_smoothing;
  Tensor<T> q = soft_target.device().is_cuda()
                    ? cuda_kernels<T>("cross_entropy")
                          .unary(UnaryFn::AddScalar,
                                 cuda_kernels<T>("cross_entropy").unary(UnaryFn::MulScalar, soft_target, 1.0 - eps, 0),
                                 eps / C, 0)
                    : ref::map(soft_target, [eps, C](auto t) {
                        using A = decltype(t);
                        return t * A(1.0 - eps) + A(eps / C);
                      });
  return detail::cross_entropy_dense(logits, q, eps, soft_target);
}

}  // namespace dg

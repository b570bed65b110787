// densegrad/ops/dropout.hpp: dropout (torch F.dropout) and drop_path (timm's stochastic depth).
// Randomness comes only from the dg::Generator passed in: same seed, same mask. Masks are not
// torch's (different RNG), so parity with torch is statistical, not bitwise.
// Shape legend: x: any shape; drop_path: x: (N, ...), one keep/drop draw per sample n.
#pragma once

#include "../backend/ref/dropout.hpp"
#include "elementwise.hpp"

namespace dg {

namespace detail {
/// out = x * mask * scale as one recorded op. Saves the 0/1 mask (not x): the gradient is
/// dout * mask * scale, which needs nothing else.
template <class T>
Tensor<T> apply_mask(const Tensor<T>& x, const Tensor<T>& mask, double scale, const char* op) {
  // the mask is drawn on the host (same seed, same mask on every device) and moved to x's device
  Tensor<T> m = mask.to(x.device());
  auto f = [scale](auto v, auto k) { return k != decltype(k)(0) ? v * decltype(v)(scale) : decltype(v)(0); };
  Tensor<T> out = pointwise2(op, x, m, BinaryFn::MaskedScale, f, scale);
  return autograd::record(op, out, {x}, [m, scale, op, f](const Tensor<T>& dout) {
    return std::vector<Tensor<T>>{pointwise2(op, dout, m, BinaryFn::MaskedScale, f, scale)};
  });
}
}  // namespace detail

/// torch.nn.functional.dropout(x, p, training): zeroes each element with probability p and
/// scales the rest by 1/(1-p); p = 1 gives zeros; identity (x itself) when !training or p == 0.
/// Example: dg::Generator gen(0); auto y = dg::dropout(x, 0.1, model.is_training(), gen);
template <class T>
Tensor<T> dropout(const Tensor<T>& x, double p, bool training, Generator& gen) {
  DG_CHECK(p >= 0.0 && p <= 1.0, "dropout: probability has to be between 0 and 1, got p=", p);
  if (!training || p == 0.0) return x;
  const double keep = 1.0 - p;
  Tensor<T> mask = ref::bernoulli_mask<T>(x.shape(), keep, gen);
  return detail::apply_mask(x, mask, keep > 0.0 ? 1.0 / keep : 0.0, "dropout");
}

/// timm.layers.drop_path(x, drop_prob, training, scale_by_keep): drops whole samples (one
/// Bernoulli(1 - drop_prob) draw per index of dim 0, broadcast over the rest) and divides the
/// survivors by keep_prob when scale_by_keep and keep_prob > 0. Identity when !training or
/// drop_prob == 0. Used on residual branches: y = x + drop_path(branch(x), ...).
template <class T>
Tensor<T> drop_path(const Tensor<T>& x, double drop_prob, bool training, Generator& gen, bool scale_by_keep = true) {
  DG_CHECK(drop_prob >= 0.0 && drop_prob <= 1.0, "drop_path: drop_prob has to be between 0 and 1, got ", drop_prob);
  if (!training || drop_prob == 0.0) return x;
  DG_CHECK(x.dim() >= 1, "drop_path: expected a tensor with a batch dim, got shape ", shape_str(x.shape()));
  const double keep = 1.0 - drop_prob;
  Shape mshape(static_cast<size_t>(x.dim()), 1);  // (N, 1, ..., 1)
  mshape[0] = x.size(0);
  Tensor<T> mask = ref::bernoulli_mask<T>(mshape, keep, gen);
  return detail::apply_mask(x, mask, scale_by_keep && keep > 0.0 ? 1.0 / keep : 1.0, "drop_path");
}

}  // namespace dg

// densegrad/autograd/gradcheck.hpp: checks an op's backward against central finite
// differences in double precision, element by element (torch.autograd.gradcheck).
// Public: users check their own ops with it. Builds the full Jacobian, so keep inputs small.
#pragma once

#include <functional>
#include <sstream>

#include "../ops/reduce.hpp"

namespace dg {

struct GradcheckOptions {
  double eps = 1e-6;   // finite-difference step
  double atol = 1e-5;  // |analytical - numerical| <= atol + rtol * |numerical|
  double rtol = 1e-3;
};

/// The outcome; converts to bool, `message` says where it failed.
struct GradcheckResult {
  bool ok = true;
  std::string message;
  double max_abs_error = 0.0;
  explicit operator bool() const { return ok; }
};

/// Compares d fn(inputs) / d inputs from backward() with finite differences, for every
/// input that requires grad and every output element. fn must be deterministic.
/// Example: dg::gradcheck([](auto& v) { return dg::exp(v[0]); }, {x.requires_grad_()});
inline GradcheckResult gradcheck(const std::function<Tensor<double>(const std::vector<Tensor<double>>&)>& fn,
                                 std::vector<Tensor<double>> inputs, GradcheckOptions opt = {}) {
  GradcheckResult res;
  // own contiguous copies, so perturbing them cannot touch the caller's tensors
  std::vector<bool> check(inputs.size());
  for (size_t i = 0; i < inputs.size(); ++i) {
    check[i] = inputs[i].requires_grad();
    NoGradGuard g;
    inputs[i] = clone(inputs[i]).detach();
    if (check[i]) inputs[i].requires_grad_();
  }
  auto eval = [&]() {
    NoGradGuard g;
    return contiguous(fn(inputs)).to_vector();
  };
  const std::vector<double> y0 = eval();
  const int64_t nout = static_cast<int64_t>(y0.size());
  for (size_t i = 0; i < inputs.size(); ++i) {
    if (!check[i]) continue;
    const int64_t nin = inputs[i].numel();
    // numerical Jacobian, one column per input element: (f(x+eps) - f(x-eps)) / 2eps
    std::vector<double> num(static_cast<size_t>(nin * nout));
    double* x = inputs[i].data();
    for (int64_t j = 0; j < nin; ++j) {
      const double orig = x[j];
      x[j] = orig + opt.eps;
      std::vector<double> yp = eval();
      x[j] = orig - opt.eps;
      std::vector<double> ym = eval();
      x[j] = orig;
      for (int64_t k = 0; k < nout; ++k) num[k * nin + j] = (yp[k] - ym[k]) / (2 * opt.eps);
    }
    // analytical Jacobian, one row per output element: backward of a one-hot gradient
    for (int64_t k = 0; k < nout; ++k) {
      for (auto& in : inputs) in.zero_grad();
      Tensor<double> y = fn(inputs);
      DG_CHECK(y.requires_grad(), "gradcheck: the function's output does not depend on any input requiring grad");
      Tensor<double> onehot = zeros<double>(y.shape());
      onehot.data()[k] = 1.0;
      y.backward(onehot);
      Tensor<double> g = inputs[i].grad();
      for (int64_t j = 0; j < nin; ++j) {
        double a = g.defined() ? contiguous(g).data()[j] : 0.0, n = num[k * nin + j], err = std::abs(a - n);
        res.max_abs_error = std::max(res.max_abs_error, err);
        if (res.ok && !(err <= opt.atol + opt.rtol * std::abs(n))) {
          std::ostringstream os;
          os << "gradcheck: input " << i << " element " << j << ", output element " << k << ": analytical " << a
             << " vs numerical " << n << " (abs error " << err << ")";
          res.ok = false;
          res.message = os.str();
        }
      }
    }
  }
  for (auto& in : inputs) in.zero_grad();
  return res;
}

}  // namespace dg

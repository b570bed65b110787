// The README's autograd example: a dense (concatenating) connection and its gradient.
#include <densegrad/densegrad.hpp>
#include <iostream>

int main() {
  dg::Generator gen(0);
  auto x = dg::randn<double>({2, 3}, gen).requires_grad_();     // features so far
  auto w = dg::randn<double>({3, 2}, gen).requires_grad_();     // a layer making 2 new ones
  auto h = dg::gelu(x.matmul(w));                               // the new features
  auto stage = dg::concat({x, h}, 1);               // dense: keep x, append h
  auto loss = dg::pow(stage, 2.0).sum();
  loss.backward();                                              // x gets two gradient paths

  std::cout << "stage shape " << dg::shape_str(stage.shape()) << ", loss " << loss.item() << "\n";
  std::cout << "dloss/dx " << x.grad() << "\n";
  auto check = dg::gradcheck(
      [](const std::vector<dg::Tensor<double>>& v) {
        auto hh = dg::gelu(v[0].matmul(v[1]));
        return dg::pow(dg::concat({v[0], hh}, 1), 2.0).sum();
      },
      {x.detach().requires_grad_(), w.detach().requires_grad_()});
  std::cout << "gradcheck: " << (check.ok ? "ok" : check.message) << "\n";
}

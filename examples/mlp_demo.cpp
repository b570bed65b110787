// mlp_demo: a two-layer MLP learns a noisy 2-D "two moons" problem with densegrad's autograd.
// Everything a training loop needs, written out by hand: forward, loss, backward, SGD step.
// (The RDNet trainer, examples/rdnet/train.cpp, is the same loop with real layers.)
#include <densegrad/densegrad.hpp>

#include <cmath>
#include <cstdio>

using dg::Tensor;

int main() {
  dg::Generator gen(42);
  // data: two interleaved half circles, labels 0/1, as an (N, 2) tensor and an (N, 1) target
  const int64_t n = 512;
  std::vector<float> xs, ys;
  for (int64_t i = 0; i < n; ++i) {
    int label = static_cast<int>(i % 2);
    double t = M_PI * gen.uniform();
    double x0 = label ? 1.0 - std::cos(t) : std::cos(t), x1 = label ? 0.5 - std::sin(t) : std::sin(t);
    xs.push_back(static_cast<float>(x0 + 0.1 * gen.normal()));
    xs.push_back(static_cast<float>(x1 + 0.1 * gen.normal()));
    ys.push_back(static_cast<float>(label));
  }
  Tensor<float> x = dg::tensor<float>(xs, {n, 2}), y = dg::tensor<float>(ys, {n, 1});

  // parameters of a 2 -> 32 -> 1 MLP
  const int64_t hidden = 32;
  Tensor<float> w1 = dg::randn<float>({2, hidden}, gen, 0.0, 1.0).requires_grad_();
  Tensor<float> b1 = dg::zeros<float>({hidden}).requires_grad_();
  Tensor<float> w2 = dg::randn<float>({hidden, 1}, gen, 0.0, 1.0 / std::sqrt(double(hidden))).requires_grad_();
  Tensor<float> b2 = dg::zeros<float>({1}).requires_grad_();
  std::vector<Tensor<float>> params{w1, b1, w2, b2};

  const int steps = 300;
  const double lr = 0.5;
  std::printf("mlp_demo: densegrad %s, 2-32-1 MLP, %lld points, %d steps of SGD (lr %.2f)\n", DENSEGRAD_VERSION,
              static_cast<long long>(n), steps, lr);
  for (int step = 1; step <= steps; ++step) {
    // forward: tanh hidden layer (written with exp), logistic output, binary cross-entropy
    Tensor<float> h = x.matmul(w1) + b1;
    Tensor<float> e = dg::exp(h * -2.0);
    Tensor<float> a = (1.0 - e) / (1.0 + e);                        // tanh(h)
    Tensor<float> p = 1.0 / (1.0 + dg::exp(-(a.matmul(w2) + b2)));  // sigmoid
    Tensor<float> pc = dg::clamp(p, 1e-6, 1 - 1e-6);
    Tensor<float> loss = -(y * dg::log(pc) + (1.0 - y) * dg::log(1.0 - pc)).mean();

    for (auto& t : params) t.zero_grad();
    loss.backward();
    {
      dg::NoGradGuard no_grad;  // the update is not part of the graph
      for (auto& t : params) t.copy_(t - t.grad() * lr);
    }
    if (step == 1 || step % 30 == 0) {
      double correct = 0;
      auto pv = p.to_vector();
      for (int64_t i = 0; i < n; ++i) correct += (pv[i] > 0.5f) == (ys[i] > 0.5f);
      int filled = step * 30 / steps;
      std::printf("[%-30s] step %3d/%d  loss %.4f  accuracy %5.1f%%\n", std::string(filled, '#').c_str(), step,
                  steps, static_cast<double>(loss.item()), 100.0 * correct / n);
    }
  }
  return 0;
}

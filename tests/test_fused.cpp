// tests/test_fused.cpp: gelu_conv2d (ops/fused.hpp): finite-difference gradchecks in double,
// parity with torch's conv2d(gelu(h)) (tests/fixtures/fused.safetensors), bit-for-bit equality
// with the two ops it fuses on the fast CPU paths (panel GEMMs over several images, a dense
// stage's prefix view), what it keeps for backward (h, not gelu(h)), and its errors.
#include "test_util.hpp"

#include <densegrad/ops/fused.hpp>

namespace test_fused {

using namespace dg;
using Catch::Contains;
using V = std::vector<Tensor<double>>;

// ---------------------------------------------------------------- gradcheck (double)

TEST_CASE("gelu_conv2d gradcheck 1x1 with and without bias, k3 s2 tanh, only some inputs") {
  Generator gen(11);
  auto h = [&](Shape s) { return (randn<double>(s, gen) * 2.0).requires_grad_(); };
  auto w = [&](Shape s) { return randn<double>(s, gen).requires_grad_(); };
  Tensor<double> b = randn<double>({5}, gen).requires_grad_();
  dgtest::require_gradcheck([](const V& v) { return gelu_conv2d(v[0], v[1], v[2]); },
                            {h({2, 6, 3, 5}), w({5, 6, 1, 1}), b});
  dgtest::require_gradcheck([](const V& v) { return gelu_conv2d(v[0], v[1]); }, {h({3, 4, 2, 2}), w({3, 4, 1, 1})});
  dgtest::require_gradcheck(
      [](const V& v) { return gelu_conv2d(v[0], v[1], v[2], /*stride=*/2, /*padding=*/1, 1, 1, /*tanh=*/true); },
      {h({2, 3, 7, 7}), w({5, 3, 3, 3}), b});
  dgtest::require_gradcheck([](const V& v) { return gelu_conv2d(v[0], v[1], {}, 1, 1, 1, /*groups=*/2); },
                            {h({1, 4, 5, 5}), w({6, 2, 3, 3})});
  // h alone (weight held), and the weight alone (h held)
  Tensor<double> w_held = randn<double>({4, 6, 1, 1}, gen), h_held = randn<double>({2, 6, 3, 3}, gen);
  dgtest::require_gradcheck([&](const V& v) { return gelu_conv2d(v[0], w_held); }, {h({2, 6, 3, 3})});
  dgtest::require_gradcheck([&](const V& v) { return gelu_conv2d(h_held, v[0]); }, {w({4, 6, 1, 1})});
}

// ---------------------------------------------------------------- PyTorch parity (float)

namespace {
void check_parity(const std::string& name, bool bias, Pair2 stride, Pair2 padding, bool tanh_form) {
  auto fx = dgtest::load_fixture<float>("fused");
  auto get = [&](const std::string& k) { return dgtest::get(fx, name + "." + k); };
  auto close = [&](const Tensor<float>& got, const Tensor<float>& want, const std::string& what) {
    dgtest::require_close_scaled(got, want, name + " " + what);
  };
  Tensor<float> h = get("h").requires_grad_(), w = get("w").requires_grad_();
  Tensor<float> b = bias ? get("b").requires_grad_() : Tensor<float>();
  Tensor<float> y = gelu_conv2d(h, w, b, stride, padding, 1, 1, tanh_form);
  close(y, get("out"), "forward");
  y.backward(get("dout"));
  close(h.grad(), get("dh"), "dh");
  close(w.grad(), get("dw"), "dweight");
  if (bias) close(b.grad(), get("db"), "dbias");
}
}  // namespace

TEST_CASE("gelu_conv2d 1x1 with bias parity") { check_parity("pw_bias", true, 1, 0, false); }
TEST_CASE("gelu_conv2d 1x1 without bias parity") { check_parity("pw_nobias", false, 1, 0, false); }
TEST_CASE("gelu_conv2d k3 s2 tanh parity") { check_parity("k3s2_tanh", true, 2, 1, true); }

// ---------------------------------------------------------------- the same as the two ops

TEST_CASE("gelu_conv2d equals conv2d(gelu(h)) bit for bit, prefix views included") {
  Generator gen(5);
  // batch 8 of 7x7 and 14x14 maps: the panel GEMM paths (several images per GEMM, vector tails);
  // the last case reads h as a dense stage's prefix: channels [0, 24) of a 40-channel buffer
  struct Case {
    Shape h;
    int64_t c_out;
    bool prefix;
  };
  for (const Case& c : {Case{{8, 24, 7, 7}, 16, false}, Case{{8, 32, 14, 14}, 48, false}, Case{{3, 5, 4, 6}, 7, false},
                        Case{{8, 24, 7, 7}, 16, true}}) {
    INFO("h " << shape_str(c.h) << (c.prefix ? " (prefix view)" : ""));
    Tensor<float> base = randn<float>({c.h[0], c.prefix ? 40 : c.h[1], c.h[2], c.h[3]}, gen) * 2.0f;
    Tensor<float> w0 = randn<float>({c.c_out, c.h[1], 1, 1}, gen), b0 = randn<float>({c.c_out}, gen);
    Tensor<float> dout = randn<float>({c.h[0], c.c_out, c.h[2], c.h[3]}, gen);
    auto run = [&](bool fused) {
      Tensor<float> src = base.detach().requires_grad_(), w = w0.detach().requires_grad_(),
                    b = b0.detach().requires_grad_();
      Tensor<float> h = c.prefix ? narrow(src, 1, 0, c.h[1]) : src;
      Tensor<float> y = fused ? gelu_conv2d(h, w, b) : conv2d(gelu(h), w, b);
      y.backward(dout);
      return std::vector<std::vector<float>>{y.to_vector(), src.grad().to_vector(), w.grad().to_vector(),
                                             b.grad().to_vector()};
    };
    const auto fused = run(true), twice = run(false);
    CHECK(fused[0] == twice[0]);
    CHECK(fused[1] == twice[1]);
    CHECK(fused[2] == twice[2]);
    CHECK(fused[3] == twice[3]);
  }
}

TEST_CASE("gelu_conv2d keeps h for backward, not gelu(h)") {
  Generator gen(3);
  // both require grad: conv2d(gelu(h), w) then keeps gelu(h) for dweight, and gelu keeps h
  Tensor<float> h = randn<float>({4, 16, 6, 6}, gen).requires_grad_(),
                w = randn<float>({8, 16, 1, 1}, gen).requires_grad_();
  const size_t gelu_bytes = static_cast<size_t>(h.numel()) * sizeof(float);
  const size_t before = cpu_memory_allocated();
  Tensor<float> fused = gelu_conv2d(h, w);
  const size_t held_fused = cpu_memory_allocated() - before;  // the output only: h is shared, not copied
  Tensor<float> twice = conv2d(gelu(h), w);
  const size_t held_twice = cpu_memory_allocated() - before - held_fused;  // the output and gelu(h)
  CHECK(held_fused == static_cast<size_t>(fused.numel()) * sizeof(float));
  CHECK(held_twice == held_fused + gelu_bytes);
  // without gradients nothing is kept at all, and the values still agree
  NoGradGuard no_grad;
  CHECK(gelu_conv2d(h, w).to_vector() == twice.to_vector());
}

TEST_CASE("gelu_conv2d on the CPU applies the GELU per chunk of images: forward never holds gelu(h)") {
  Generator gen(9);
  // batch 8, 1x1 and k2 s2 (im2col), erf and tanh: where the conv runs as panel GEMMs, the GELU
  // of each chunk goes to the thread's scratch on the way in, and the values are still those of
  // conv2d(gelu(h)) bit for bit
  for (int64_t k : {1, 2})
    for (bool tanh_form : {false, true}) {
      INFO("kernel " << k << (tanh_form ? ", tanh form" : ", erf form"));
      const Tensor<float> h = randn<float>({8, 40, 14, 14}, gen) * 2.0f;
      const Tensor<float> w = randn<float>({24, 40, k, k}, gen), b = randn<float>({24}, gen);
      const Conv2dGeometry g = detail::conv2d_checked_geometry(h, w, b, k, 0, 1, 1, "test");
      NoGradGuard no_grad;
      const size_t before = cpu_memory_allocated();
      cpu_reset_peak_memory_stats();
      const Tensor<float> fused = gelu_conv2d(h, w, b, k, 0, 1, 1, tanh_form);
      const size_t peak = cpu_max_memory_allocated() - before, out = static_cast<size_t>(fused.numel()) * 4;
      const size_t gelu_bytes = static_cast<size_t>(h.numel()) * 4;
      if (cpu::forward_runs_panels(g)) CHECK(peak == out);  // AVX2 or AVX-512, 8 images >= threads
      else CHECK(peak == out + gelu_bytes);                  // gelu(h), then the conv
      CHECK(fused.to_vector() == conv2d(gelu(h, tanh_form), w, b, k).to_vector());
    }
}

TEST_CASE("gelu_conv2d rejects bad shapes and devices naming itself") {
  Tensor<float> h = zeros<float>({2, 4, 5, 5}), w = zeros<float>({3, 4, 1, 1});
  CHECK_THROWS_WITH(gelu_conv2d(h, zeros<float>({3, 5, 1, 1})), Contains("gelu_conv2d: x has 4 channels"));
  CHECK_THROWS_WITH(gelu_conv2d(zeros<float>({4, 5, 5}), w), Contains("gelu_conv2d: expected x of shape (N, C_in, H, W)"));
  CHECK_THROWS_WITH(gelu_conv2d(h, w, zeros<float>({4})), Contains("gelu_conv2d: expected bias of shape [3]"));
  CHECK_THROWS_WITH(gelu_conv2d(h, w, {}, 0), Contains("gelu_conv2d: stride must be positive"));
  CHECK_THROWS_WITH(gelu_conv2d(Tensor<float>(), w), Contains("gelu_conv2d: x and weight must be defined"));
}

}  // namespace test_fused

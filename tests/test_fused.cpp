// tests/test_fused.cpp: gelu_conv2d, layer_norm2d_conv2d and depthwise_layer_norm2d_conv2d
// (ops/fused.hpp): finite-difference gradchecks in double, parity with torch's conv2d(gelu(h)),
// conv2d(LayerNorm2d(x)) and conv2d(LayerNorm2d(depthwise(x))) (tests/fixtures/fused.safetensors),
// bit-for-bit equality with the ops each fuses on the fast CPU paths (panel GEMMs over several
// images, a dense stage's prefix view), what each keeps for backward (h, not gelu(h); x, not the
// normalized x; x, not the depthwise output), and their errors.
#include "test_util.hpp"

#include <array>
#include <functional>

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

namespace {
/// Runs f(leaves, fused) on fresh leaves with the given values, once for the fused op and once for
/// the ops it fuses, backpropagates dout through both, and checks that the outputs and every
/// leaf's gradient are equal to the bit. `names` lists them in that order, for the failure message.
void require_same_bits(const std::vector<Tensor<float>>& values, const Tensor<float>& dout,
                       const std::function<Tensor<float>(const std::vector<Tensor<float>>&, bool)>& f,
                       const char* names, int threads = 0) {
  std::vector<std::vector<float>> got[2];
  for (const bool fused : {true, false}) dgtest::with_threads(threads > 0 ? threads : cpu::max_threads(), [&] {
    std::vector<Tensor<float>> leaves;
    for (const Tensor<float>& v : values) leaves.push_back(v.detach().requires_grad_());
    Tensor<float> y = f(leaves, fused);
    y.backward(dout);
    std::vector<std::vector<float>>& out = got[fused ? 0 : 1];
    out.push_back(y.to_vector());
    for (const Tensor<float>& l : leaves) out.push_back(l.grad().to_vector());
  });
  for (size_t i = 0; i < got[0].size(); ++i) {
    INFO("output " << i << " (" << names << ")");
    CHECK(got[0][i] == got[1][i]);
  }
}
}  // namespace

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
    require_same_bits(
        {base, w0, b0}, dout,
        [&](const std::vector<Tensor<float>>& l, bool fused) {
          Tensor<float> h = c.prefix ? narrow(l[0], 1, 0, c.h[1]) : l[0];
          return fused ? gelu_conv2d(h, l[1], l[2]) : conv2d(gelu(h), l[1], l[2]);
        },
        "y, dh, dweight, dbias");
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

// ---------------------------------------------------------------- layer_norm2d_conv2d

TEST_CASE("layer_norm2d_conv2d gradcheck: 1x1 and k2 s2, with and without biases, only some inputs") {
  Generator gen(21);
  auto x = [&](Shape s) { return (randn<double>(s, gen) * 2.0 + 0.5).requires_grad_(); };
  auto p = [&](Shape s, double shift) { return (randn<double>(s, gen) * 0.5 + shift).requires_grad_(); };
  dgtest::require_gradcheck(
      [](const V& v) { return layer_norm2d_conv2d(v[0], v[1], v[2], 1e-6, v[3], v[4]); },
      {x({2, 6, 3, 5}), p({6}, 1.0), p({6}, 0.0), p({5, 6, 1, 1}, 0.0), p({5}, 0.0)});
  dgtest::require_gradcheck(
      [](const V& v) { return layer_norm2d_conv2d(v[0], v[1], v[2], 1e-5, v[3], {}, /*stride=*/2); },
      {x({2, 4, 6, 4}), p({4}, 1.0), p({4}, 0.0), p({3, 4, 2, 2}, 0.0)});
  // no affine norm; padding and groups pass through to the conv
  dgtest::require_gradcheck(
      [](const V& v) { return layer_norm2d_conv2d(v[0], {}, {}, 1e-6, v[1], v[2], 1, /*padding=*/1, 1, /*groups=*/2); },
      {x({1, 4, 4, 3}), p({6, 2, 3, 3}, 0.0), p({6}, 0.0)});
  // x alone, the norm's parameters alone, the conv's weight alone
  Tensor<double> xh = randn<double>({2, 5, 3, 3}, gen), nwh = randn<double>({5}, gen) + 1.0,
                 nbh = randn<double>({5}, gen), wh = randn<double>({4, 5, 1, 1}, gen);
  dgtest::require_gradcheck([&](const V& v) { return layer_norm2d_conv2d(v[0], nwh, nbh, 1e-6, wh); }, {x({2, 5, 3, 3})});
  dgtest::require_gradcheck([&](const V& v) { return layer_norm2d_conv2d(xh, v[0], v[1], 1e-6, wh); },
                            {p({5}, 1.0), p({5}, 0.0)});
  dgtest::require_gradcheck([&](const V& v) { return layer_norm2d_conv2d(xh, nwh, nbh, 1e-6, v[0]); },
                            {p({4, 5, 1, 1}, 0.0)});
}

namespace {
void check_ln_parity(const std::string& name, bool bias, Pair2 stride) {
  auto fx = dgtest::load_fixture<float>("fused");
  auto get = [&](const std::string& k) { return dgtest::get(fx, name + "." + k); };
  auto close = [&](const Tensor<float>& got, const Tensor<float>& want, const std::string& what) {
    dgtest::require_close_scaled(got, want, name + " " + what);
  };
  Tensor<float> x = get("x").requires_grad_(), nw = get("nw").requires_grad_(), nb = get("nb").requires_grad_(),
                w = get("w").requires_grad_();
  Tensor<float> b = bias ? get("b").requires_grad_() : Tensor<float>();
  Tensor<float> y = layer_norm2d_conv2d(x, nw, nb, 1e-6, w, b, stride);
  close(y, get("out"), "forward");
  y.backward(get("dout"));
  close(x.grad(), get("dx"), "dx");
  close(nw.grad(), get("dnw"), "dnorm_weight");
  close(nb.grad(), get("dnb"), "dnorm_bias");
  close(w.grad(), get("dw"), "dweight");
  if (bias) close(b.grad(), get("db"), "dbias");
}
}  // namespace

TEST_CASE("layer_norm2d_conv2d 1x1 with bias parity") { check_ln_parity("ln_pw", true, 1); }
TEST_CASE("layer_norm2d_conv2d k2 s2 without bias parity") { check_ln_parity("ln_k2s2", false, 2); }

TEST_CASE("layer_norm2d_conv2d equals conv2d(layer_norm2d(x)) bit for bit, prefix views included") {
  Generator gen(6);
  struct Case {
    Shape x;
    int64_t c_out, k;
    bool prefix;
  };
  // panel GEMMs over several images (1x1 and k2 s2), where backward runs chunk by chunk of
  // images (the norm's backward too), on 1 and 2 threads; odd sizes; maps of more than one
  // norm tile (17x17 = 289 pixels); and x as a dense stage's prefix view (channels [0, 24) of a
  // 40-channel buffer): read in place by the norm, saved as the view
  for (const int threads : {1, 2})
  for (const Case& c : {Case{{8, 24, 7, 7}, 16, 1, false}, Case{{8, 32, 14, 14}, 48, 2, false},
                        Case{{3, 5, 4, 6}, 7, 1, false}, Case{{8, 24, 7, 7}, 16, 1, true},
                        Case{{4, 24, 8, 8}, 12, 2, true}, Case{{6, 16, 17, 17}, 40, 1, false},
                        Case{{5, 20, 18, 18}, 8, 2, true}}) {
    INFO("x " << shape_str(c.x) << " kernel " << c.k << (c.prefix ? " (prefix view)" : "") << ", threads "
              << threads);
    Tensor<float> base = randn<float>({c.x[0], c.prefix ? 40 : c.x[1], c.x[2], c.x[3]}, gen) * 2.0f + 1.0f;
    Tensor<float> nw0 = randn<float>({c.x[1]}, gen) * 0.3f + 1.0f, nb0 = randn<float>({c.x[1]}, gen) * 0.3f;
    Tensor<float> w0 = randn<float>({c.c_out, c.x[1], c.k, c.k}, gen), b0 = randn<float>({c.c_out}, gen);
    Tensor<float> dout = randn<float>({c.x[0], c.c_out, c.x[2] / c.k, c.x[3] / c.k}, gen);
    require_same_bits(
        {base, nw0, nb0, w0, b0}, dout,
        [&](const std::vector<Tensor<float>>& l, bool fused) {
          Tensor<float> x = c.prefix ? narrow(l[0], 1, 0, c.x[1]) : l[0];
          return fused ? layer_norm2d_conv2d(x, l[1], l[2], 1e-6, l[3], l[4], c.k)
                       : conv2d(layer_norm2d(x, l[1], l[2], 1e-6), l[3], l[4], c.k);
        },
        "y, dx, dnorm_weight, dnorm_bias, dweight, dbias", threads);
  }
}

TEST_CASE("layer_norm2d_conv2d equals conv2d(layer_norm2d(x)) bit for bit when only some inputs ask for gradients") {
  Generator gen(16);
  const Tensor<float> x0 = randn<float>({8, 24, 7, 7}, gen) * 2.0f + 1.0f, nw0 = randn<float>({24}, gen) * 0.3f + 1.0f,
                      nb0 = randn<float>({24}, gen) * 0.3f, w0 = randn<float>({16, 24, 1, 1}, gen),
                      b0 = randn<float>({16}, gen), dout = randn<float>({8, 16, 7, 7}, gen);
  // which of x, the norm's weight and bias, the conv's weight and bias ask for a gradient
  for (const std::array<bool, 5> need : {std::array<bool, 5>{true, false, false, true, false},
                                         std::array<bool, 5>{false, true, true, true, true},
                                         std::array<bool, 5>{false, true, false, true, false},
                                         std::array<bool, 5>{true, true, true, false, false},
                                         std::array<bool, 5>{false, false, false, true, true}}) {
    INFO("x, nw, nb, w, b ask for gradients: " << need[0] << need[1] << need[2] << need[3] << need[4]);
    std::vector<std::vector<float>> got[2];
    for (const bool fused : {true, false}) {
      std::vector<Tensor<float>> l;
      for (const Tensor<float>& v : {x0, nw0, nb0, w0, b0}) l.push_back(v.detach());
      for (size_t i = 0; i < l.size(); ++i)
        if (need[i]) l[i].requires_grad_();
      Tensor<float> y = fused ? layer_norm2d_conv2d(l[0], l[1], l[2], 1e-6, l[3], l[4])
                              : conv2d(layer_norm2d(l[0], l[1], l[2], 1e-6), l[3], l[4]);
      y.backward(dout);
      got[fused ? 0 : 1].push_back(y.to_vector());
      for (size_t i = 0; i < l.size(); ++i) {
        CHECK(l[i].grad().defined() == need[i]);
        if (need[i]) got[fused ? 0 : 1].push_back(l[i].grad().to_vector());
      }
    }
    REQUIRE(got[0].size() == got[1].size());
    for (size_t i = 0; i < got[0].size(); ++i) CHECK(got[0][i] == got[1][i]);
  }
}

TEST_CASE("layer_norm2d_conv2d keeps x and the statistics for backward, not the normalized x") {
  Generator gen(4);
  Tensor<float> x = randn<float>({4, 16, 6, 6}, gen).requires_grad_(), nw = ones<float>({16}).requires_grad_(),
                nb = zeros<float>({16}).requires_grad_(), w = randn<float>({32, 16, 1, 1}, gen).requires_grad_();
  const size_t normalized = static_cast<size_t>(x.numel()) * sizeof(float), stats = 2 * 4 * 6 * 6 * sizeof(float);
  const size_t before = cpu_memory_allocated();
  Tensor<float> fused = layer_norm2d_conv2d(x, nw, nb, 1e-6, w);
  const size_t held_fused = cpu_memory_allocated() - before;  // the output and the mean and rstd
  Tensor<float> twice = conv2d(layer_norm2d(x, nw, nb, 1e-6), w);
  const size_t held_twice = cpu_memory_allocated() - before - held_fused;  // and the normalized x too
  const size_t out = static_cast<size_t>(fused.numel()) * sizeof(float);
  CHECK(held_fused == out + stats);
  CHECK(held_twice == out + stats + normalized);
  // only the conv's bias asks for a gradient: nothing but the output is kept
  {
    Tensor<float> bg = zeros<float>({32}).requires_grad_();
    const size_t start = cpu_memory_allocated();
    Tensor<float> y = layer_norm2d_conv2d(x.detach(), nw.detach(), nb.detach(), 1e-6, w.detach(), bg);
    CHECK(cpu_memory_allocated() - start == out);
    y.backward(ones<float>(y.shape()));
    CHECK(bg.grad().to_vector() == std::vector<float>(32, 4 * 6 * 6));
  }
  NoGradGuard no_grad;
  CHECK(layer_norm2d_conv2d(x, nw, nb, 1e-6, w).to_vector() == twice.to_vector());
}

TEST_CASE("layer_norm2d_conv2d backward on the CPU runs chunk by chunk: the normalized x never exists whole") {
  Generator gen(17);
  // batch 8, 1x1 and k2 s2 (im2col): where the conv's gradients run as panel GEMMs, each chunk of
  // images is normalized again into the thread's scratch for dweight, and the norm's backward
  // turns the conv's dx into x's gradient in place; backward then holds one tensor as large as x.
  // Apart (the other paths), the normalized x and the conv's dx exist at once: two.
  for (int64_t k : {1, 2}) {
    INFO("kernel " << k);
    Tensor<float> x = (randn<float>({8, 40, 14, 14}, gen) * 2.0f).requires_grad_();
    Tensor<float> nw = (randn<float>({40}, gen) * 0.3f + 1.0f).requires_grad_(), nb = zeros<float>({40}).requires_grad_();
    Tensor<float> w = randn<float>({24, 40, k, k}, gen).requires_grad_(), b = randn<float>({24}, gen).requires_grad_();
    const Conv2dGeometry g = detail::conv2d_checked_geometry(x, w, b, k, 0, 1, 1, "test");
    Tensor<float> y = layer_norm2d_conv2d(x, nw, nb, 1e-6, w, b, k);
    const Tensor<float> dout = randn<float>(y.shape(), gen);
    const size_t before = cpu_memory_allocated(), x_bytes = static_cast<size_t>(x.numel()) * 4;
    cpu_reset_peak_memory_stats();
    y.backward(dout);
    const size_t peak = cpu_max_memory_allocated() - before;
    if (cpu::backward_runs_panels<float>(g)) CHECK(peak < x_bytes + x_bytes / 2);  // AVX2 or AVX-512, 8 images >= threads
    else CHECK(peak >= 2 * x_bytes);
    CHECK(x.grad().defined());
  }
}

TEST_CASE("layer_norm2d_conv2d rejects bad shapes and devices naming itself") {
  Tensor<float> x = zeros<float>({2, 4, 5, 5}), nw = ones<float>({4}), w = zeros<float>({3, 4, 1, 1});
  CHECK_THROWS_WITH(layer_norm2d_conv2d(zeros<float>({4, 5, 5}), nw, nw, 1e-6, w),
                    Contains("layer_norm2d_conv2d: expected a 4-D (N, C, H, W) input, got 3-D"));
  CHECK_THROWS_WITH(layer_norm2d_conv2d(x, ones<float>({5}), nw, 1e-6, w),
                    Contains("layer_norm2d_conv2d: weight has shape [5], expected [4]"));
  CHECK_THROWS_WITH(layer_norm2d_conv2d(x, nw, ones<float>({3}), 1e-6, w),
                    Contains("layer_norm2d_conv2d: bias has shape [3], expected [4]"));
  CHECK_THROWS_WITH(layer_norm2d_conv2d(x, nw, nw, 1e-6, zeros<float>({3, 5, 1, 1})),
                    Contains("layer_norm2d_conv2d: x has 4 channels"));
  CHECK_THROWS_WITH(layer_norm2d_conv2d(x, nw, nw, 1e-6, w, zeros<float>({4})),
                    Contains("layer_norm2d_conv2d: expected bias of shape [3]"));
  CHECK_THROWS_WITH(layer_norm2d_conv2d(Tensor<float>(), nw, nw, 1e-6, w),
                    Contains("layer_norm2d_conv2d: the input must be a defined tensor"));
}

// ---------------------------------------------------------------- depthwise_layer_norm2d_conv2d

TEST_CASE("depthwise_layer_norm2d_conv2d gradcheck: 7x7 and 3x3, with and without biases, only some inputs") {
  Generator gen(31);
  auto x = [&](Shape s) { return (randn<double>(s, gen) * 2.0 + 0.5).requires_grad_(); };
  auto p = [&](Shape s, double scale, double shift) { return (randn<double>(s, gen) * scale + shift).requires_grad_(); };
  // a dense block's head: depthwise 7x7 pad 3, norm, 1x1 expansion, every tensor asking
  dgtest::require_gradcheck(
      [](const V& v) { return depthwise_layer_norm2d_conv2d(v[0], v[1], v[2], 3, v[3], v[4], 1e-6, v[5], v[6]); },
      {x({2, 3, 5, 6}), p({3, 1, 7, 7}, 0.3, 0.0), p({3}, 0.5, 0.0), p({3}, 0.5, 1.0), p({3}, 0.5, 0.0),
       p({4, 3, 1, 1}, 0.5, 0.0), p({4}, 0.5, 0.0)});
  // 3x3 pad 1 and a k2 s2 conv after it, no biases, no affine norm
  dgtest::require_gradcheck(
      [](const V& v) { return depthwise_layer_norm2d_conv2d(v[0], v[1], {}, 1, {}, {}, 1e-5, v[2], {}, /*stride=*/2); },
      {x({2, 4, 6, 4}), p({4, 1, 3, 3}, 0.5, 0.0), p({3, 4, 2, 2}, 0.5, 0.0)});
  // one input at a time: x, the depthwise weight, the norm's parameters, the conv's weight
  Tensor<double> xh = randn<double>({2, 5, 4, 4}, gen), dwh = randn<double>({5, 1, 3, 3}, gen) * 0.3,
                 nwh = randn<double>({5}, gen) + 1.0, nbh = randn<double>({5}, gen), wh = randn<double>({4, 5, 1, 1}, gen);
  dgtest::require_gradcheck([&](const V& v) { return depthwise_layer_norm2d_conv2d(v[0], dwh, {}, 1, nwh, nbh, 1e-6, wh); },
                            {x({2, 5, 4, 4})});
  dgtest::require_gradcheck([&](const V& v) { return depthwise_layer_norm2d_conv2d(xh, v[0], v[1], 1, nwh, nbh, 1e-6, wh); },
                            {p({5, 1, 3, 3}, 0.3, 0.0), p({5}, 0.5, 0.0)});
  dgtest::require_gradcheck([&](const V& v) { return depthwise_layer_norm2d_conv2d(xh, dwh, {}, 1, v[0], v[1], 1e-6, wh); },
                            {p({5}, 0.5, 1.0), p({5}, 0.5, 0.0)});
  dgtest::require_gradcheck([&](const V& v) { return depthwise_layer_norm2d_conv2d(xh, dwh, {}, 1, nwh, nbh, 1e-6, v[0]); },
                            {p({4, 5, 1, 1}, 0.5, 0.0)});
}

namespace {
void check_dw_parity(const std::string& name, bool bias, Pair2 padding) {
  auto fx = dgtest::load_fixture<float>("fused");
  auto get = [&](const std::string& k) { return dgtest::get(fx, name + "." + k); };
  auto close = [&](const Tensor<float>& got, const Tensor<float>& want, const std::string& what) {
    dgtest::require_close_scaled(got, want, name + " " + what);
  };
  Tensor<float> x = get("x").requires_grad_(), dww = get("dww").requires_grad_(), nw = get("nw").requires_grad_(),
                nb = get("nb").requires_grad_(), w = get("w").requires_grad_();
  Tensor<float> dwb = bias ? get("dwb").requires_grad_() : Tensor<float>();
  Tensor<float> b = bias ? get("b").requires_grad_() : Tensor<float>();
  Tensor<float> y = depthwise_layer_norm2d_conv2d(x, dww, dwb, padding, nw, nb, 1e-6, w, b);
  close(y, get("out"), "forward");
  y.backward(get("dout"));
  close(x.grad(), get("dx"), "dx");
  close(dww.grad(), get("ddww"), "ddepthwise_weight");
  close(nw.grad(), get("dnw"), "dnorm_weight");
  close(nb.grad(), get("dnb"), "dnorm_bias");
  close(w.grad(), get("dw"), "dweight");
  if (bias) {
    close(dwb.grad(), get("ddwb"), "ddepthwise_bias");
    close(b.grad(), get("db"), "dbias");
  }
}
}  // namespace

TEST_CASE("depthwise_layer_norm2d_conv2d 7x7 with biases parity") { check_dw_parity("dw_ln_pw", true, 3); }
TEST_CASE("depthwise_layer_norm2d_conv2d 3x3 without biases parity") { check_dw_parity("dw3_ln_pw_nobias", false, 1); }

TEST_CASE("depthwise_layer_norm2d_conv2d equals conv2d(layer_norm2d(conv2d(x))) bit for bit, prefix views included") {
  Generator gen(8);
  struct Case {
    Shape x;
    int64_t k, c_out;
    bool prefix;
  };
  // RDNet's 7x7 on maps where the depthwise kernels take their row blocks, panel GEMMs after the
  // norm, odd sizes, and x as a dense stage's prefix view (channels [0, 24) of 40): read in place
  // by the depthwise conv and kept as the view it is
  for (const Case& c : {Case{{8, 24, 14, 14}, 7, 96, false}, Case{{3, 5, 4, 6}, 3, 7, false},
                        Case{{8, 24, 7, 7}, 7, 96, true}, Case{{2, 24, 9, 5}, 5, 16, true}}) {
    INFO("x " << shape_str(c.x) << " depthwise " << c.k << "x" << c.k << (c.prefix ? " (prefix view)" : ""));
    const int64_t C = c.x[1], pad = c.k / 2;
    Tensor<float> base = randn<float>({c.x[0], c.prefix ? 40 : C, c.x[2], c.x[3]}, gen) * 2.0f + 0.5f;
    Tensor<float> dww0 = randn<float>({C, 1, c.k, c.k}, gen) * 0.3f, dwb0 = randn<float>({C}, gen);
    Tensor<float> nw0 = randn<float>({C}, gen) * 0.3f + 1.0f, nb0 = randn<float>({C}, gen) * 0.3f;
    Tensor<float> w0 = randn<float>({c.c_out, C, 1, 1}, gen), b0 = randn<float>({c.c_out}, gen);
    Tensor<float> dout = randn<float>({c.x[0], c.c_out, c.x[2], c.x[3]}, gen);
    require_same_bits(
        {base, dww0, dwb0, nw0, nb0, w0, b0}, dout,
        [&](const std::vector<Tensor<float>>& l, bool fused) {
          Tensor<float> x = c.prefix ? narrow(l[0], 1, 0, C) : l[0];
          return fused ? depthwise_layer_norm2d_conv2d(x, l[1], l[2], pad, l[3], l[4], 1e-6, l[5], l[6])
                       : conv2d(layer_norm2d(conv2d(x, l[1], l[2], 1, pad, 1, C), l[3], l[4], 1e-6), l[5], l[6]);
        },
        "y, dx, ddw_weight, ddw_bias, dnorm_weight, dnorm_bias, dweight, dbias");
  }
}

TEST_CASE("depthwise_layer_norm2d_conv2d keeps x and the statistics for backward, not the depthwise output") {
  Generator gen(5);
  Tensor<float> x = randn<float>({4, 16, 6, 6}, gen).requires_grad_(), dww = randn<float>({16, 1, 7, 7}, gen).requires_grad_(),
                nw = ones<float>({16}).requires_grad_(), nb = zeros<float>({16}).requires_grad_(),
                w = randn<float>({32, 16, 1, 1}, gen).requires_grad_();
  const size_t wide = static_cast<size_t>(x.numel()) * sizeof(float), stats = 2 * 4 * 6 * 6 * sizeof(float);
  const size_t before = cpu_memory_allocated();
  Tensor<float> fused = depthwise_layer_norm2d_conv2d(x, dww, {}, 3, nw, nb, 1e-6, w);
  const size_t held_fused = cpu_memory_allocated() - before;  // the output and the mean and rstd
  Tensor<float> apart = layer_norm2d_conv2d(conv2d(x, dww, {}, 1, 3, 1, 16), nw, nb, 1e-6, w);
  const size_t held_apart = cpu_memory_allocated() - before - held_fused;  // and the depthwise output too
  const size_t out = static_cast<size_t>(fused.numel()) * sizeof(float);
  CHECK(held_fused == out + stats);
  CHECK(held_apart == out + stats + wide);
  CHECK(fused.to_vector() == apart.to_vector());
  // only the conv's bias asks for a gradient: nothing but the output is kept
  {
    Tensor<float> bg = zeros<float>({32}).requires_grad_();
    const size_t start = cpu_memory_allocated();
    Tensor<float> y = depthwise_layer_norm2d_conv2d(x.detach(), dww.detach(), {}, 3, nw.detach(), nb.detach(), 1e-6,
                                                    w.detach(), bg);
    CHECK(cpu_memory_allocated() - start == out);
    y.backward(ones<float>(y.shape()));
    CHECK(bg.grad().to_vector() == std::vector<float>(32, 4 * 6 * 6));
  }
}

TEST_CASE("depthwise_layer_norm2d_conv2d rejects bad shapes and devices naming itself") {
  Tensor<float> x = zeros<float>({2, 4, 5, 5}), dw = zeros<float>({4, 1, 3, 3}), nw = ones<float>({4}),
                w = zeros<float>({3, 4, 1, 1});
  const std::string op = "depthwise_layer_norm2d_conv2d: ";
  CHECK_THROWS_WITH(depthwise_layer_norm2d_conv2d(zeros<float>({4, 5, 5}), dw, {}, 1, nw, nw, 1e-6, w),
                    Contains(op + "expected x of shape (N, C, H, W), got a 3-D tensor of shape [4, 5, 5]"));
  CHECK_THROWS_WITH(depthwise_layer_norm2d_conv2d(x, zeros<float>({4, 2, 3, 3}), {}, 1, nw, nw, 1e-6, w),
                    Contains(op + "expected a depthwise weight of shape (4, 1, kH, kW) for x with 4 channels, got [4, 2, 3, 3]"));
  CHECK_THROWS_WITH(depthwise_layer_norm2d_conv2d(x, zeros<float>({8, 1, 3, 3}), {}, 1, nw, nw, 1e-6, w),
                    Contains(op + "expected a depthwise weight of shape (4, 1, kH, kW)"));
  CHECK_THROWS_WITH(depthwise_layer_norm2d_conv2d(x, dw, zeros<float>({3}), 1, nw, nw, 1e-6, w),
                    Contains(op + "expected bias of shape [4]"));
  CHECK_THROWS_WITH(depthwise_layer_norm2d_conv2d(x, dw, {}, 1, ones<float>({5}), nw, 1e-6, w),
                    Contains(op + "norm weight has shape [5], expected [4]"));
  CHECK_THROWS_WITH(depthwise_layer_norm2d_conv2d(x, dw, {}, 1, nw, ones<float>({3}), 1e-6, w),
                    Contains(op + "norm bias has shape [3], expected [4]"));
  CHECK_THROWS_WITH(depthwise_layer_norm2d_conv2d(x, dw, {}, 1, nw, nw, 1e-6, zeros<float>({3, 5, 1, 1})),
                    Contains(op + "x has 4 channels"));
  CHECK_THROWS_WITH(depthwise_layer_norm2d_conv2d(x, dw, {}, 1, nw, nw, 1e-6, w, zeros<float>({4})),
                    Contains(op + "expected bias of shape [3]"));
  CHECK_THROWS_WITH(depthwise_layer_norm2d_conv2d(x, zeros<float>({4, 1, 9, 9}), {}, 1, nw, nw, 1e-6, w),
                    Contains(op + "kernel size 9x9 (after dilation) is larger than the padded input 7x7"));
  CHECK_THROWS_WITH(depthwise_layer_norm2d_conv2d(Tensor<float>(), dw, {}, 1, nw, nw, 1e-6, w),
                    Contains(op + "x and the depthwise weight must be defined tensors"));
  CHECK_THROWS_WITH(depthwise_layer_norm2d_conv2d(x, dw, {}, 1, nw, nw, 1e-6, Tensor<float>()),
                    Contains(op + "the conv weight must be a defined tensor"));
}

}  // namespace test_fused

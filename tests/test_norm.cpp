// tests/test_norm.cpp: the norm family: layer_norm and layer_norm2d. Gradcheck in double on odd
// shapes (with and without affine, eps variants, non-contiguous inputs), parity with PyTorch/timm
// fixtures (forward and every input gradient), the fast NCHW path against the ref kernel, errors.
#include <cstring>

#include "test_util.hpp"

#include <densegrad/ops/norm.hpp>

namespace test_norm {

using namespace dg;
using Catch::Contains;

namespace {

using V = std::vector<Tensor<double>>;

Tensor<double> rnd(const Shape& s, Generator& gen, double scale = 1.0, double shift = 0.0) {
  return randn<double>(s, gen, shift, scale);
}

/// Runs y = f() and backward(dout) on fresh leaves; returns {y, dx, dw, db} (undefined where absent).
template <class T, class F>
std::vector<Tensor<T>> forward_backward(F f, Tensor<T> x, Tensor<T> w, Tensor<T> b, const Tensor<T>& dout) {
  for (Tensor<T>* t : {&x, &w, &b})
    if (t->defined()) *t = t->detach().requires_grad_();
  Tensor<T> y = f(x, w, b);
  y.backward(dout);
  return {y, x.grad(), w.defined() ? w.grad() : Tensor<T>(), b.defined() ? b.grad() : Tensor<T>()};
}

/// Compares our layer_norm / layer_norm2d with fixture case `name`: forward, dx, dw, db against
/// torch in float32, and dx also against torch's float64 answer for the same inputs (dx_f64).
/// dx_atol loosens the dx comparisons for ill-conditioned cases (see their comment).
template <class F>
void check_parity(const std::string& name, F f, double dx_atol = 1e-6) {
  const double rtol = 1e-5, atol = 1e-6;
  auto fx = dgtest::load_fixture<float>("norm");
  const bool affine = fx.count(name + ".w") > 0;
  Tensor<float> w = affine ? dgtest::get(fx, name + ".w") : Tensor<float>();
  Tensor<float> b = affine ? dgtest::get(fx, name + ".b") : Tensor<float>();
  auto r = forward_backward<float>(f, dgtest::get(fx, name + ".x"), w, b, dgtest::get(fx, name + ".dout"));
  dgtest::require_close(r[0], dgtest::get(fx, name + ".out"), rtol, atol, name + " forward");
  dgtest::require_close(r[1], dgtest::get(fx, name + ".dx"), rtol, dx_atol, name + " dx");
  dgtest::require_close(r[1], dgtest::get(fx, name + ".dx_f64"), rtol, dx_atol, name + " dx vs float64");
  if (affine) {
    dgtest::require_close(r[2], dgtest::get(fx, name + ".dw"), rtol, atol, name + " dweight");
    dgtest::require_close(r[3], dgtest::get(fx, name + ".db"), rtol, atol, name + " dbias");
  }
}

/// Tolerances for the fast path vs the ref kernel: float sums over C in float (ref: double);
/// bfloat16 keeps 8 bits, so one rounding step apart is 2^-8 relative.
template <class T> double fast_rtol() { return std::is_same_v<T, double> ? 1e-12 : std::is_same_v<T, float> ? 1e-5 : 1e-2; }
template <class T> double fast_atol() { return std::is_same_v<T, double> ? 1e-12 : std::is_same_v<T, float> ? 1e-5 : 2e-2; }

}  // namespace

// ---------------------------------------------------------------- gradcheck (double)

TEST_CASE("layer_norm gradcheck last dim, affine, batch 1 and 3") {
  Generator gen(1);
  for (const Shape& s : {Shape{1, 7}, Shape{3, 5}, Shape{3, 1, 9}}) {
    INFO(shape_str(s));
    const int64_t n = s.back();
    dgtest::require_gradcheck([n](const V& v) { return layer_norm(v[0], {n}, v[1], v[2]); },
                              {rnd(s, gen).requires_grad_(), rnd({n}, gen).requires_grad_(), rnd({n}, gen).requires_grad_()});
  }
}

TEST_CASE("layer_norm gradcheck normalized_shape of 2 dims, eps variants") {
  Generator gen(2);
  for (double eps : {1e-5, 1e-2, 0.5}) {
    INFO("eps " << eps);
    dgtest::require_gradcheck([eps](const V& v) { return layer_norm(v[0], {3, 5}, v[1], v[2], eps); },
                              {rnd({3, 3, 5}, gen, 2.0, 1.0).requires_grad_(), rnd({3, 5}, gen).requires_grad_(),
                               rnd({3, 5}, gen).requires_grad_()});
  }
}

TEST_CASE("layer_norm gradcheck without affine") {
  Generator gen(3);
  dgtest::require_gradcheck([](const V& v) { return layer_norm(v[0], {5}); }, {rnd({3, 5}, gen).requires_grad_()});
  dgtest::require_gradcheck([](const V& v) { return layer_norm(v[0], {3, 7}, {}, {}, 1e-3); },
                            {rnd({1, 3, 7}, gen).requires_grad_()});
  // weight only (bias absent) and a weight that needs no gradient
  Tensor<double> w = rnd({5}, gen);
  dgtest::require_gradcheck([w](const V& v) { return layer_norm(v[0], {5}, w); }, {rnd({3, 5}, gen).requires_grad_()});
}

TEST_CASE("layer_norm gradcheck non-contiguous input") {
  Generator gen(4);
  // x^T: the normalized dim has stride 5 in memory
  dgtest::require_gradcheck([](const V& v) { return layer_norm(v[0].transpose(0, 1), {3}, v[1], v[2]); },
                            {rnd({3, 5}, gen).requires_grad_(), rnd({3}, gen).requires_grad_(), rnd({3}, gen).requires_grad_()});
}

TEST_CASE("layer_norm2d gradcheck odd shapes, with and without affine") {
  Generator gen(5);
  for (const Shape& s : {Shape{1, 3, 7, 9}, Shape{3, 5, 1, 1}, Shape{3, 1, 3, 3}, Shape{1, 5, 1, 7}}) {
    INFO(shape_str(s));
    const int64_t c = s[1];
    dgtest::require_gradcheck([](const V& v) { return layer_norm2d(v[0], v[1], v[2]); },
                              {rnd(s, gen).requires_grad_(), rnd({c}, gen).requires_grad_(), rnd({c}, gen).requires_grad_()});
    dgtest::require_gradcheck([](const V& v) { return layer_norm2d(v[0]); }, {rnd(s, gen).requires_grad_()});
  }
}

TEST_CASE("layer_norm2d gradcheck eps variants and non-contiguous input") {
  Generator gen(6);
  for (double eps : {1e-6, 1e-3, 1.0}) {
    INFO("eps " << eps);
    dgtest::require_gradcheck([eps](const V& v) { return layer_norm2d(v[0], v[1], v[2], eps); },
                              {rnd({3, 3, 3, 5}, gen, 0.5).requires_grad_(), rnd({3}, gen).requires_grad_(),
                               rnd({3}, gen).requires_grad_()});
  }
  // an NHWC buffer seen as NCHW (channels-last strides), and a strided slice of W
  dgtest::require_gradcheck([](const V& v) { return layer_norm2d(v[0].permute({0, 3, 1, 2}), v[1], v[2]); },
                            {rnd({2, 3, 5, 3}, gen).requires_grad_(), rnd({3}, gen).requires_grad_(), rnd({3}, gen).requires_grad_()});
  dgtest::require_gradcheck([](const V& v) { return layer_norm2d(v[0].slice(3, 0, 7, 2), v[1], v[2]); },
                            {rnd({1, 5, 3, 7}, gen).requires_grad_(), rnd({5}, gen).requires_grad_(), rnd({5}, gen).requires_grad_()});
}

TEST_CASE("layer_norm2d equals layer_norm over channels of the NHWC view, gradients too") {
  Generator gen(7);
  Tensor<double> x = rnd({3, 5, 7, 9}, gen), w = rnd({5}, gen), b = rnd({5}, gen), dout = rnd({3, 5, 7, 9}, gen);
  // affine, weight only, bias only, none
  for (auto [wi, bi] : {std::pair{w, b}, std::pair{w, Tensor<double>()}, std::pair{Tensor<double>(), b},
                        std::pair{Tensor<double>(), Tensor<double>()}}) {
    INFO("weight " << wi.defined() << " bias " << bi.defined());
    auto a = forward_backward<double>([](auto x_, auto w_, auto b_) { return layer_norm2d(x_, w_, b_, 1e-6); }, x, wi, bi, dout);
    auto r = forward_backward<double>([](auto x_, auto w_, auto b_) {
      return layer_norm(x_.permute({0, 2, 3, 1}), {5}, w_, b_, 1e-6).permute({0, 3, 1, 2});
    }, x, wi, bi, dout);
    for (size_t i = 0; i < 4; ++i) {
      REQUIRE(a[i].defined() == r[i].defined());
      if (a[i].defined()) dgtest::require_close(a[i], r[i], 1e-12, 1e-12);
    }
  }
}

TEST_CASE("layer_norm2d gradients accumulate when one input feeds two norms") {
  Generator gen(8);
  Tensor<double> x = rnd({2, 3, 3, 5}, gen).requires_grad_(), w = rnd({3}, gen).requires_grad_();
  Tensor<double> w2 = rnd({3}, gen);
  (sum(layer_norm2d(x, w)) + sum(mul(layer_norm2d(x, w2), layer_norm2d(x, w)))).backward();
  Tensor<double> dx = x.grad().clone(), dw = w.grad().clone();
  // the same sum of three uses, one backward each
  x.zero_grad();
  w.zero_grad();
  sum(layer_norm2d(x, w)).backward();
  Tensor<double> x1 = x.grad().clone(), w1 = w.grad().clone();
  x.zero_grad();
  w.zero_grad();
  sum(mul(layer_norm2d(x, w2), layer_norm2d(x, w))).backward();
  dgtest::require_close(dx, add(x1, x.grad()), 1e-12, 1e-12);
  dgtest::require_close(dw, add(w1, w.grad()), 1e-12, 1e-12);
}

// ---------------------------------------------------------------- parity with PyTorch / timm (float)

TEST_CASE("layer_norm last dim parity") {
  check_parity("ln_last", [](auto x, auto w, auto b) { return layer_norm(x, {7}, w, b); });
}
TEST_CASE("layer_norm 2-dim normalized_shape, shifted input parity") {
  check_parity("ln_2dims", [](auto x, auto w, auto b) { return layer_norm(x, {5, 4}, w, b); });
}
TEST_CASE("layer_norm no affine eps 1e-3 parity") {
  check_parity("ln_noaffine_eps1e-3", [](auto x, auto, auto) { return layer_norm(x, {9}, {}, {}, 1e-3); });
}
TEST_CASE("layer_norm2d eps 1e-6 parity") {
  check_parity("ln2d_eps1e-6", [](auto x, auto w, auto b) { return layer_norm2d(x, w, b, 1e-6); });
}
TEST_CASE("layer_norm2d batch 1 eps 1e-5 shifted input parity") {
  // Ill-conditioned on purpose: 3 channels around mean 2, variance down to 1.3e-3 (rstd ~ 27).
  // Any float32 dx then carries ~ulp(mean) * rstd^2 * |dnorm| ~ 1.2e-7 * 750 ~ 1e-4 of error: torch's
  // float32 dx is 1.2e-4 from its float64 dx, ours too (at other elements), hence atol 2e-4 for dx.
  // Forward, dweight and dbias still hold 1e-5.
  check_parity("ln2d_batch1_eps1e-5", [](auto x, auto w, auto b) { return layer_norm2d(x, w, b, 1e-5); }, 2e-4);
}
TEST_CASE("layer_norm2d no affine parity") {
  check_parity("ln2d_noaffine", [](auto x, auto, auto) { return layer_norm2d(x); });
}
TEST_CASE("layer_norm2d spatial 1x1, 17 channels parity") {
  check_parity("ln2d_spatial1", [](auto x, auto w, auto b) { return layer_norm2d(x, w, b); });
}

// ---------------------------------------------------------------- fast path vs ref kernel

TEMPLATE_TEST_CASE("layer_norm2d fast path matches ref on odd shapes", "", float, double, bfloat16) {
  using T = TestType;
  Generator gen(9);
  for (const Shape& s : {Shape{1, 1, 1, 1}, Shape{3, 5, 7, 9}, Shape{2, 3, 1, 7}, Shape{1, 17, 3, 5},
                         Shape{3, 3, 17, 19} /* 323 pixels: two tiles, the second partial */, Shape{2, 64, 16, 16}}) {
    for (bool affine : {true, false}) {
      INFO(shape_str(s) << (affine ? " affine" : " no affine"));
      const int64_t c = s[1];
      Tensor<T> x = randn<T>(s, gen, 0.5, 2.0), dy = randn<T>(s, gen);
      Tensor<T> w = affine ? randn<T>({c}, gen) : Tensor<T>(), b = affine ? randn<T>({c}, gen) : Tensor<T>();
      auto fast = cpu::layer_norm2d_forward(x, w, b, 1e-6);
      auto ref = ref::layer_norm2d_forward(x, w, b, 1e-6);
      dgtest::require_close(fast.y, ref.y, fast_rtol<T>(), fast_atol<T>(), "y");
      dgtest::require_close(fast.mean, ref.mean, fast_rtol<T>(), fast_atol<T>(), "mean");
      dgtest::require_close(fast.rstd, ref.rstd, fast_rtol<T>(), fast_atol<T>(), "rstd");
      auto gf = cpu::layer_norm2d_backward(dy, x, ref.mean, ref.rstd, w, true, affine, affine);
      auto gr = ref::layer_norm2d_backward(dy, x, ref.mean, ref.rstd, w, true, affine, affine);
      // dx subtracts two row means from dnorm: allow the cancellation a few float steps of |dy * w|
      dgtest::require_close(gf.dx, gr.dx, fast_rtol<T>(), 10 * fast_atol<T>(), "dx");
      if (affine) {  // sums over N * H * W elements
        dgtest::require_close(gf.dweight, gr.dweight, 10 * fast_rtol<T>(), 10 * fast_atol<T>(), "dweight");
        dgtest::require_close(gf.dbias, gr.dbias, 10 * fast_rtol<T>(), 10 * fast_atol<T>(), "dbias");
      }
    }
  }
}

TEMPLATE_TEST_CASE("layer_norm2d_apply: the forward's output from its saved statistics, to the bit", "", float,
                   double, bfloat16) {
  using T = TestType;
  Generator gen(10);
  for (const Shape& s : {Shape{1, 1, 1, 1}, Shape{3, 3, 17, 19}, Shape{2, 64, 16, 16}}) {
    for (bool affine : {true, false}) {
      INFO(shape_str(s) << (affine ? " affine" : " no affine"));
      const int64_t c = s[1];
      const Tensor<T> big = randn<T>({s[0], c + 3, s[2], s[3]}, gen, 0.5, 2.0);
      const Tensor<T> x = big.narrow(1, 1, c);  // a stage's window of channels: batch-strided
      const Tensor<T> w = affine ? randn<T>({c}, gen) : Tensor<T>(), b = affine ? randn<T>({c}, gen) : Tensor<T>();
      const auto f = cpu::layer_norm2d_forward(x, w, b, 1e-6);
      const std::vector<T> want = f.y.to_vector(), got = cpu::layer_norm2d_apply(x, w, b, f.mean, f.rstd).to_vector();
      REQUIRE(got.size() == want.size());
      CHECK(std::memcmp(got.data(), want.data(), got.size() * sizeof(T)) == 0);
    }
  }
  const Tensor<T> x = randn<T>({2, 3, 4, 5}, gen);
  const auto f = cpu::layer_norm2d_forward(x, Tensor<T>(), Tensor<T>(), 1e-6);
  CHECK_THROWS_WITH(cpu::layer_norm2d_apply(x, Tensor<T>(), Tensor<T>(), f.mean.narrow(0, 0, 1), f.rstd),
                    Catch::Contains("its (N, H, W) statistics, got x [2, 3, 4, 5] strides [60, 20, 5, 1], mean [1, 4, 5]"));
}

TEMPLATE_TEST_CASE("layer_norm2d op on non-contiguous inputs matches ref", "", float, double, bfloat16) {
  using T = TestType;
  Generator gen(10);
  // channels-last memory, a stepped slice of H, and a weight that is every other element of a buffer
  Tensor<T> nhwc = randn<T>({3, 7, 9, 5}, gen), big = randn<T>({3, 5, 13, 9}, gen), wbuf = randn<T>({10}, gen);
  Tensor<T> b = randn<T>({5}, gen);
  for (const Tensor<T>& x : {nhwc.permute({0, 3, 1, 2}), big.slice(2, 1, 13, 2)}) {
    INFO(shape_str(x.shape()) << " strides " << shape_str(x.strides()));
    REQUIRE_FALSE(x.is_contiguous());
    Tensor<T> w = wbuf.slice(0, 0, 10, 2), dy = randn<T>(x.shape(), gen);
    auto r = forward_backward<T>([](auto x_, auto w_, auto b_) { return layer_norm2d(x_, w_, b_); }, x, w, b, dy);
    auto ref = ref::layer_norm2d_forward(x, w, b, 1e-6);
    auto gr = ref::layer_norm2d_backward(dy, x, ref.mean, ref.rstd, w, true, true, true);
    dgtest::require_close(r[0], ref.y, fast_rtol<T>(), fast_atol<T>(), "y");
    dgtest::require_close(r[1], gr.dx, fast_rtol<T>(), 10 * fast_atol<T>(), "dx");
    dgtest::require_close(r[2], gr.dweight, 10 * fast_rtol<T>(), 10 * fast_atol<T>(), "dweight");
    dgtest::require_close(r[3], gr.dbias, 10 * fast_rtol<T>(), 10 * fast_atol<T>(), "dbias");
  }
}

TEST_CASE("layer_norm ref kernel on non-contiguous input equals the contiguous copy") {
  Generator gen(11);
  Tensor<float> x = randn<float>({4, 6, 5}, gen).permute({2, 0, 1}), w = randn<float>({6}, gen);
  Tensor<float> a = layer_norm(x, {6}, w), c = layer_norm(x.contiguous(), {6}, w);
  dgtest::require_close(a, c, 0, 0);
}

// ---------------------------------------------------------------- errors

TEST_CASE("layer_norm errors name the op, the rule and the shapes") {
  Tensor<float> x = zeros<float>({2, 5, 4});
  REQUIRE_THROWS_WITH(layer_norm(x, {5}), Contains("layer_norm: normalized_shape [5]") && Contains("got input [2, 5, 4]"));
  REQUIRE_THROWS_WITH(layer_norm(x, {2, 5, 4, 1}), Contains("last 4 dims are [2, 5, 4, 1]"));
  REQUIRE_THROWS_WITH(layer_norm(x, {}), Contains("layer_norm: normalized_shape must have at least 1 dim"));
  REQUIRE_THROWS_WITH(layer_norm(x, {5, 4}, zeros<float>({4})),
                      Contains("layer_norm: weight has shape [4], expected [5, 4]"));
  REQUIRE_THROWS_WITH(layer_norm(x, {4}, zeros<float>({4}), zeros<float>({5})),
                      Contains("layer_norm: bias has shape [5], expected [4]"));
}

TEST_CASE("layer_norm2d errors name the op, the rule and the shapes") {
  REQUIRE_THROWS_WITH(layer_norm2d(zeros<float>({2, 3, 4})),
                      Contains("layer_norm2d: expected a 4-D (N, C, H, W) input, got 3-D [2, 3, 4]"));
  REQUIRE_THROWS_WITH(layer_norm2d(zeros<float>({1, 3, 4, 4}), zeros<float>({4})),
                      Contains("layer_norm2d: weight has shape [4], expected [3]"));
  REQUIRE_THROWS_WITH(layer_norm2d(zeros<float>({1, 3, 4, 4}), zeros<float>({3}), zeros<float>({3, 1})),
                      Contains("layer_norm2d: bias has shape [3, 1], expected [3]"));
}

}  // namespace test_norm

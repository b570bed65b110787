// tests/test_conv.cpp: conv2d: finite-difference gradchecks in double on odd shapes, forward
// and gradient parity with torch.nn.functional.conv2d (tests/fixtures/conv.safetensors), the
// fast CPU kernels vs the ref kernels for float/double/bfloat16, non-contiguous inputs, errors.
#include "test_util.hpp"

#include <densegrad/ops/conv.hpp>

namespace test_conv {

using namespace dg;
using Catch::Contains;

namespace {

/// One conv2d call's arguments (shapes and hyper-parameters).
struct Case {
  Shape x, w;
  bool bias;
  Pair2 stride = 1, padding = 0, dilation = 1;
  int64_t groups = 1;
};

Tensor<double> run(const Case& c, const std::vector<Tensor<double>>& v) {
  return conv2d(v[0], v[1], c.bias ? v[2] : Tensor<double>(), c.stride, c.padding, c.dilation, c.groups);
}

void gradcheck_case(const Case& c, uint64_t seed) {
  Generator gen(seed);
  std::vector<Tensor<double>> in{randn<double>(c.x, gen).requires_grad_(), randn<double>(c.w, gen).requires_grad_()};
  if (c.bias) in.push_back(randn<double>({c.w[0]}, gen).requires_grad_());
  // conv2d is linear in each input, so central differences are exact up to rounding
  dgtest::require_gradcheck([&](const std::vector<Tensor<double>>& v) { return run(c, v); }, in);
}

}  // namespace

// ---------------------------------------------------------------- gradcheck (double)

TEST_CASE("conv2d gradcheck dense k3 p1, batch 3, 3->5 channels, 7x7") {
  gradcheck_case({{3, 3, 7, 7}, {5, 3, 3, 3}, true, 1, 1}, 1);
}

TEST_CASE("conv2d gradcheck batch 1, 1 channel, 1x1 spatial") {
  gradcheck_case({{1, 1, 1, 1}, {1, 1, 3, 3}, true, 1, 1}, 2);  // only the centre tap sees data
  gradcheck_case({{3, 5, 1, 1}, {3, 5, 1, 1}, true}, 3);         // SE-style 1x1 on a 1x1 map
}

TEST_CASE("conv2d gradcheck stride 2 on odd 9x9 input") {
  gradcheck_case({{1, 3, 9, 9}, {5, 3, 3, 3}, true, 2, 1}, 4);
  gradcheck_case({{3, 3, 9, 9}, {3, 3, 2, 2}, true, 2, 0}, 5);  // k2 s2: last row/column never read
}

TEST_CASE("conv2d gradcheck depthwise k7 p3 and strided dilated depthwise") {
  gradcheck_case({{1, 5, 9, 9}, {5, 1, 7, 7}, true, 1, 3, 1, 5}, 6);
  gradcheck_case({{3, 3, 9, 9}, {3, 1, 3, 3}, true, 2, 1, 2, 3}, 7);
}

TEST_CASE("conv2d gradcheck grouped convs") {
  gradcheck_case({{1, 4, 7, 7}, {6, 2, 3, 3}, true, 1, 1, 1, 2}, 8);  // C_in 4, groups 2
  gradcheck_case({{3, 3, 5, 5}, {6, 1, 3, 3}, true, 1, 1, 1, 3}, 9);  // depthwise with multiplier 2
}

TEST_CASE("conv2d gradcheck dilation 2") {
  gradcheck_case({{1, 3, 9, 9}, {5, 3, 3, 3}, true, 1, 2, 2}, 10);
}

TEST_CASE("conv2d gradcheck padding larger than half the kernel") {
  gradcheck_case({{1, 3, 5, 5}, {3, 3, 3, 3}, true, 1, 2}, 11);
  gradcheck_case({{1, 3, 7, 7}, {5, 3, 1, 1}, true, 1, 1}, 12);  // 1x1 with padding: border is bias only
}

TEST_CASE("conv2d gradcheck without bias") {
  gradcheck_case({{3, 3, 7, 7}, {5, 3, 3, 3}, false, 1, 1}, 13);
  gradcheck_case({{3, 5, 7, 7}, {3, 5, 1, 1}, false}, 14);  // pointwise: the GEMM-only path
}

TEST_CASE("conv2d gradcheck rectangular kernel with (h, w) stride, padding and dilation") {
  gradcheck_case({{1, 3, 7, 9}, {4, 3, 2, 3}, true, {2, 1}, {1, 0}, {1, 2}}, 15);
}

TEST_CASE("conv2d gradients only for inputs that require grad") {
  Generator gen(16);
  Tensor<double> x = randn<double>({2, 3, 5, 5}, gen), w = randn<double>({4, 3, 3, 3}, gen),
                 b = randn<double>({4}, gen).requires_grad_();
  conv2d(x, w, b, 1, 1).sum().backward();
  REQUIRE_FALSE(x.grad().defined());
  REQUIRE_FALSE(w.grad().defined());
  dgtest::require_close(b.grad(), full<double>({4}, 50.0));  // bias is added at 2*5*5 positions
  // x alone, through a bias-less conv: weight is held constant
  dgtest::require_gradcheck([&](const std::vector<Tensor<double>>& v) { return conv2d(v[0], w, {}, 2, 1); },
                            {randn<double>({1, 3, 5, 5}, gen).requires_grad_()});
}

// ---------------------------------------------------------------- PyTorch parity (float)

namespace {
/// Forward and every gradient of one fixture case vs torch. rtol 1e-5 as everywhere; atol is
/// 1e-6 of the tensor's largest magnitude: outputs near zero come from sums of up to 245
/// terms of size ~1 whose float rounding depends on summation order (torch's vs ours).
void check_parity(const std::string& name, bool bias, Pair2 stride, Pair2 padding, Pair2 dilation, int64_t groups) {
  auto fx = dgtest::load_fixture<float>("conv");
  auto get = [&](const std::string& k) { return dgtest::get(fx, name + "." + k); };
  auto close = [&](const Tensor<float>& got, const Tensor<float>& want, const std::string& what) {
    double mx = 0;
    for (float v : want.to_vector()) mx = std::max(mx, double(std::abs(v)));
    dgtest::require_close(got, want, 1e-5, 1e-6 * std::max(1.0, mx), name + " " + what);
  };
  Tensor<float> x = get("x").requires_grad_(), w = get("w").requires_grad_();
  Tensor<float> b = bias ? get("b").requires_grad_() : Tensor<float>();
  Tensor<float> y = conv2d(x, w, b, stride, padding, dilation, groups);
  close(y, get("out"), "forward");
  y.backward(get("dout"));
  close(x.grad(), get("dx"), "dx");
  close(w.grad(), get("dw"), "dweight");
  if (bias) close(b.grad(), get("db"), "dbias");
}
}  // namespace

TEST_CASE("conv2d stem k4 s4 parity") { check_parity("stem_k4s4", true, 4, 0, 1, 1); }
TEST_CASE("conv2d depthwise k7 p3 parity") { check_parity("dw_k7p3", true, 1, 3, 1, 5); }
TEST_CASE("conv2d 1x1 with bias parity") { check_parity("pw_bias", true, 1, 0, 1, 1); }
TEST_CASE("conv2d 1x1 without bias parity") { check_parity("pw_nobias", false, 1, 0, 1, 1); }
TEST_CASE("conv2d k2 s2 on odd 9x9 parity") { check_parity("k2s2_odd", true, 2, 0, 1, 1); }
TEST_CASE("conv2d grouped k3 parity") { check_parity("grouped_k3", true, 1, 1, 1, 2); }
TEST_CASE("conv2d SE 1x1 on 1x1 spatial parity") { check_parity("se_1x1", true, 1, 0, 1, 1); }
TEST_CASE("conv2d dilation 2 parity") { check_parity("dilated_k3d2", true, 1, 2, 2, 1); }

// ---------------------------------------------------------------- fast path vs ref kernel

namespace {
template <class T>
double max_abs(const Tensor<T>& t) {
  double m = 0;
  for (T v : t.to_vector()) m = std::max(m, std::abs(double(acc_t<T>(v))));
  return m;
}
/// Tolerance for comparing two summation orders: relative to the result's largest magnitude
/// (cancellation near zero), and for bfloat16 one unit in the last place (2^-8 relative):
/// both paths sum in float, then a float a hair either side of a rounding boundary may land
/// on neighbouring bfloat16 values.
template <class T>
void close_to_ref(const Tensor<T>& fast, const Tensor<T>& ref, const std::string& what) {
  const double tol = std::is_same_v<T, double> ? 1e-12 : std::is_same_v<T, float> ? 1e-5 : 1e-2;
  dgtest::require_close(fast, ref, tol, tol * std::max(1.0, max_abs(ref)), what);
}

/// The shapes the fast kernels must get right: odd sizes (1, 3, 7, 17), every path (GEMM with
/// and without im2col, grouped, depthwise direct), strides, dilation, padding past k/2.
std::vector<Case> fast_path_cases() {
  std::vector<Case> cs;
  for (int64_t n : {1, 3})
    for (int64_t s : {1, 3, 7, 17}) {
      for (auto [ci, co] : {std::pair<int64_t, int64_t>{1, 3}, {3, 7}, {17, 1}, {7, 17}}) {
        cs.push_back({{n, ci, s, s}, {co, ci, 3, 3}, true, 1, 1});         // dense k3 p1
        cs.push_back({{n, ci, s, s}, {co, ci, 1, 1}, n == 1});             // pointwise (GEMM only)
        cs.push_back({{n, ci, s, s}, {co, ci, 1, 1}, true, 2});            // 1x1 stride 2 (im2col)
        cs.push_back({{n, ci, s, s}, {co, ci, 4, 4}, true, 4});            // stem k4 s4
        cs.push_back({{n, ci, s, s}, {co, ci, 2, 2}, false, 2});           // transition k2 s2
        cs.push_back({{n, ci, s, s}, {co, ci, 3, 3}, true, 1, 3, 2});      // dilation 2, padding 3
      }
      for (int64_t c : {1, 3, 7, 17}) {
        cs.push_back({{n, c, s, s}, {c, 1, 7, 7}, true, 1, 3, 1, c});      // depthwise k7 p3
        cs.push_back({{n, c, s, s}, {c, 1, 3, 3}, false, 2, 2, 2, c});     // depthwise s2 d2 p2
        cs.push_back({{n, c, s, s}, {2 * c, 1, 3, 3}, true, 1, 1, 1, c});  // channel multiplier 2
      }
      cs.push_back({{n, 6, s, s}, {9, 2, 3, 3}, true, 2, 1, 1, 3});        // grouped, strided
      cs.push_back({{n, 3, s, s + 2}, {5, 3, 2, 3}, true, {1, 2}, {0, 1}, {2, 1}});  // rectangular
    }
  return cs;
}

template <class T>
void check_fast_vs_ref(const Case& c, Generator& gen) {
  Conv2dGeometry g{};
  Shape bshape{c.w[0]};
  try {
    g = conv2d_geometry(c.x, c.w, c.bias ? &bshape : nullptr, c.stride, c.padding, c.dilation, c.groups);
  } catch (const Error&) {
    return;  // kernel larger than the padded input: conv2d rejects it, nothing to compare
  }
  INFO("x " << shape_str(c.x) << " w " << shape_str(c.w) << " groups " << c.groups << " stride " << c.stride.h
            << "," << c.stride.w);
  Tensor<T> x = randn<T>(c.x, gen), w = randn<T>(c.w, gen), dout = randn<T>(g.out_shape(), gen);
  Tensor<T> b = c.bias ? randn<T>(bshape, gen) : Tensor<T>();
  close_to_ref(cpu::conv2d_forward(x, w, b, g), ref::conv2d_forward(x, w, b, g), "forward");
  close_to_ref(cpu::conv2d_backward_input(dout, w, g), ref::conv2d_backward_input(dout, w, g), "dx");
  close_to_ref(cpu::conv2d_backward_weight(dout, x, g), ref::conv2d_backward_weight(dout, x, g), "dweight");
  close_to_ref(cpu::conv2d_backward_bias(dout, g), ref::conv2d_backward_bias(dout, g), "dbias");
}
}  // namespace

TEMPLATE_TEST_CASE("conv2d fast CPU kernels match the ref kernels on odd shapes", "", float, double, bfloat16) {
  Generator gen(17);
  for (const Case& c : fast_path_cases()) check_fast_vs_ref<TestType>(c, gen);
}

TEST_CASE("conv2d bfloat16 computes in float and rounds once") {
  Generator gen(19);
  // bfloat16 inputs, and the same values as float: the bfloat16 op (grouped, strided) and its
  // gradients must equal the float op's results up to that final rounding (2^-8 relative)
  Tensor<bfloat16> x = randn<bfloat16>({2, 4, 9, 9}, gen).requires_grad_();
  Tensor<bfloat16> w = randn<bfloat16>({6, 2, 3, 3}, gen).requires_grad_();
  Tensor<bfloat16> b = randn<bfloat16>({6}, gen).requires_grad_();
  Tensor<bfloat16> dout = randn<bfloat16>({2, 6, 5, 5}, gen);
  Tensor<float> xf = x.detach().to<float>().requires_grad_(), wf = w.detach().to<float>().requires_grad_(),
                bf = b.detach().to<float>().requires_grad_();
  Tensor<bfloat16> y = conv2d(x, w, b, 2, 1, 1, 2);
  Tensor<float> yf = conv2d(xf, wf, bf, 2, 1, 1, 2);
  y.backward(dout);
  yf.backward(dout.to<float>());
  auto close = [](const Tensor<bfloat16>& got, const Tensor<float>& want, const char* what) {
    dgtest::require_close(got.to<float>(), want, 1e-2, 1e-2, what);
  };
  close(y, yf, "forward");
  close(x.grad(), xf.grad(), "dx");
  close(w.grad(), wf.grad(), "dweight");
  close(b.grad(), bf.grad(), "dbias");
}

// ---------------------------------------------------------------- non-contiguous inputs

TEST_CASE("conv2d non-contiguous inputs match their contiguous copies") {
  Generator gen(18);
  // for groups 1 and 3: a channels-last x (NHWC memory read through an NCHW view), a
  // column-strided slice of x, a weight sliced out of a wider one, a permuted dout
  for (int64_t groups : {1, 3}) {
    const int64_t C = 3, Co = groups == 1 ? 5 : 3;
    Tensor<float> x_cl = randn<float>({2, 7, 9, C}, gen).permute({0, 3, 1, 2});        // (2, 3, 7, 9)
    Tensor<float> x_sl = randn<float>({2, C, 7, 19}, gen).slice(3, 1, 19, 2);          // (2, 3, 7, 9)
    Tensor<float> w_t = randn<float>({Co, C / groups, 3, 5}, gen).slice(3, 1, 4);     // (Co, C/g, 3, 3)
    Tensor<float> b = randn<float>({Co}, gen);
    Tensor<float> dout_t = randn<float>({2, 5, 4, Co}, gen).permute({0, 3, 2, 1});     // (2, Co, 4, 5)
    REQUIRE_FALSE(x_cl.is_contiguous());
    REQUIRE_FALSE(x_sl.is_contiguous());
    REQUIRE_FALSE(w_t.is_contiguous());
    REQUIRE_FALSE(dout_t.is_contiguous());
    for (const Tensor<float>& xv : {x_cl, x_sl}) {
      INFO("groups " << groups);
      // the same values, contiguous, as separate leaves
      Tensor<float> xc = xv.contiguous().detach().requires_grad_(), wc = w_t.contiguous().detach().requires_grad_();
      Tensor<float> xn = xv.detach().requires_grad_(), wn = w_t.detach().requires_grad_();
      REQUIRE_FALSE(xn.is_contiguous());
      Tensor<float> yc = conv2d(xc, wc, b, 2, 1, 1, groups), yn = conv2d(xn, wn, b, 2, 1, 1, groups);
      dgtest::require_close(yn, yc, 1e-6, 1e-6, "forward");
      yc.backward(dout_t.contiguous());
      yn.backward(dout_t);
      dgtest::require_close(xn.grad(), xc.grad(), 1e-6, 1e-6, "dx");
      dgtest::require_close(wn.grad(), wc.grad(), 1e-6, 1e-6, "dweight");
      // and the ref kernels read the strided views directly
      Shape bs{Co};
      Conv2dGeometry g = conv2d_geometry(xn.shape(), wn.shape(), &bs, 2, 1, 1, groups);
      dgtest::require_close(ref::conv2d_forward(xn.detach(), wn.detach(), b, g), yc, 1e-5, 1e-5, "ref forward");
      dgtest::require_close(ref::conv2d_backward_weight(dout_t, xn.detach(), g), wc.grad(), 1e-5, 1e-5, "ref dw");
      dgtest::require_close(ref::conv2d_backward_input(dout_t, wn.detach(), g), xc.grad(), 1e-5, 1e-5, "ref dx");
    }
  }
}

// ---------------------------------------------------------------- errors

TEST_CASE("conv2d rejects bad shapes and arguments with clear messages") {
  auto x = zeros<float>({2, 4, 7, 7}), w = zeros<float>({6, 4, 3, 3});
  REQUIRE_THROWS_WITH(conv2d(zeros<float>({4, 7, 7}), w), Contains("expected x of shape (N, C_in, H, W), got a 3-D"));
  REQUIRE_THROWS_WITH(conv2d(x, zeros<float>({6, 4, 3})), Contains("expected weight of shape (C_out, C_in/groups"));
  REQUIRE_THROWS_WITH(conv2d(x, zeros<float>({6, 3, 3, 3})), Contains("x has 4 channels, but weight expects"));
  REQUIRE_THROWS_WITH(conv2d(x, zeros<float>({6, 4, 3, 3}), {}, 1, 0, 1, 2),
                      Contains("weight expects C_in/groups * groups = 4 * 2 = 8"));
  REQUIRE_THROWS_WITH(conv2d(x, zeros<float>({5, 2, 3, 3}), {}, 1, 0, 1, 2),
                      Contains("C_out = 5 (weight dim 0) is not divisible by groups = 2"));
  REQUIRE_THROWS_WITH(conv2d(x, zeros<float>({6, 4, 9, 9})),
                      Contains("kernel size 9x9 (after dilation) is larger than the padded input 7x7"));
  REQUIRE_THROWS_WITH(conv2d(x, w, {}, 1, 0, 4), Contains("kernel size 9x9 (after dilation)"));
  REQUIRE_NOTHROW(conv2d(x, zeros<float>({6, 4, 9, 9}), {}, 1, 1));  // padding makes it fit
  REQUIRE_THROWS_WITH(conv2d(x, w, zeros<float>({5})), Contains("expected bias of shape [6] (C_out), got [5]"));
  REQUIRE_THROWS_WITH(conv2d(x, w, zeros<float>({6, 1})), Contains("expected bias of shape [6]"));
  REQUIRE_THROWS_WITH(conv2d(x, w, {}, 0), Contains("stride must be positive, got (0, 0)"));
  REQUIRE_THROWS_WITH(conv2d(x, w, {}, {1, -1}), Contains("stride must be positive, got (1, -1)"));
  REQUIRE_THROWS_WITH(conv2d(x, w, {}, 1, 0, 0), Contains("dilation must be positive"));
  REQUIRE_THROWS_WITH(conv2d(x, w, {}, 1, -1), Contains("padding must be non-negative, got (-1, -1)"));
  REQUIRE_THROWS_WITH(conv2d(x, w, {}, 1, 0, 1, 0), Contains("groups must be positive"));
  REQUIRE_THROWS_AS(conv2d(x, w, {}, 1, 0, 1, 0), Error);
}

TEST_CASE("conv2d output size floors like PyTorch") {
  auto y = conv2d(zeros<float>({1, 1, 9, 8}), zeros<float>({1, 1, 2, 3}), {}, {2, 3}, {0, 1});
  // H: (9 - 2) / 2 + 1 = 4; W: (8 + 2 - 3) / 3 + 1 = 3
  REQUIRE(y.shape() == Shape{1, 1, 4, 3});
}

}  // namespace test_conv

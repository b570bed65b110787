// tests/test_dense.cpp: zero-copy dense connectivity (ops/dense.hpp: DenseBuffer), the CPU
// kernels that read its batch-strided prefix views in place (conv2d, layer_norm2d) against the
// ref kernels, recomputation (autograd/checkpoint.hpp), and RDNet's dense paths (naive concat,
// shared buffer, buffer + recomputation, the depthwise output kept or recomputed) giving the same
// outputs and gradients.
#include <rdnet/rdnet.hpp>

#include "test_util.hpp"

namespace test_dense {

using namespace dg;

namespace {

/// Every element equal, bit for bit (as doubles: bfloat16 and float widen exactly).
template <class T>
void require_equal(const Tensor<T>& a, const Tensor<T>& b, const std::string& what) {
  INFO(what);
  REQUIRE(a.defined());
  REQUIRE(b.defined());
  REQUIRE(shape_str(a.shape()) == shape_str(b.shape()));
  auto va = a.to_vector(), vb = b.to_vector();
  size_t i = 0;
  while (i < va.size() && double(acc_t<T>(va[i])) == double(acc_t<T>(vb[i]))) ++i;
  INFO("first difference at element " << i << " of " << va.size());
  REQUIRE(i == va.size());
}

/// x as a window of channels [c0, c0 + C) of a wider random tensor: a batch-strided view with
/// images (C + extra) * H * W apart, the layout of a dense stage's prefix.
template <class T>
Tensor<T> batch_strided(const Shape& s, int64_t c0, int64_t extra, Generator& gen) {
  Tensor<T> wide = randn<T>({s[0], s[1] + extra, s[2], s[3]}, gen);
  return wide.narrow(1, c0, s[1]);
}

/// Tolerance of a fast kernel against the ref kernel (two summation orders), relative to the
/// largest magnitude of the result; bfloat16 rounds to 8 bits.
template <class T>
void close_to_ref(const Tensor<T>& fast, const Tensor<T>& ref, const std::string& what) {
  const double tol = std::is_same_v<T, double> ? 1e-12 : std::is_same_v<T, float> ? 1e-5 : 1e-2;
  double scale = 1;
  for (auto v : ref.to_vector()) scale = std::max(scale, std::abs(double(acc_t<T>(v))));
  dgtest::require_close(fast, ref, tol, tol * scale, what);
}

}  // namespace

// ---------------------------------------------------------------- batch_stride

TEST_CASE("cpu::batch_stride: contiguous tensors and channel windows are batch-strided, other views are not") {
  auto x = zeros<float>({3, 10, 4, 5});
  CHECK(cpu::batch_stride(x) == 200);
  CHECK(cpu::batch_stride(x.narrow(1, 0, 4)) == 200);  // a prefix of the channels
  CHECK(cpu::batch_stride(x.narrow(1, 6, 4)) == 200);  // any window of them
  CHECK(cpu::batch_stride(x.narrow(0, 1, 1).narrow(1, 2, 3)) == 60);  // one image: C*H*W
  CHECK(cpu::batch_stride(x.narrow(2, 0, 2)) == -1);   // rows cut: planes not dense
  CHECK(cpu::batch_stride(x.permute({0, 2, 3, 1})) == -1);
  CHECK(cpu::batch_stride(x.slice(3, 0, 5, 2)) == -1);
  CHECK(cpu::batch_stride(zeros<float>({3, 10, 20})) == -1);  // not 4-D
  CHECK(cpu::batch_stride(zeros<float>({3, 1, 4, 5}).expand({3, 2, 4, 5})) == -1);
}

// ---------------------------------------------------------------- DenseBuffer

TEST_CASE("DenseBuffer: append copies only the new channels and returns prefix views of one buffer") {
  Generator gen(1);
  auto x0 = randn<float>({2, 3, 4, 5}, gen), x1 = randn<float>({2, 2, 4, 5}, gen), x2 = randn<float>({2, 4, 4, 5}, gen);
  DenseBuffer<float> buf(x0, 9);
  CHECK(buf.channels() == 9);
  Tensor<float> p0 = buf.append(x0);
  CHECK(buf.filled() == 3);
  require_equal(p0, x0, "first prefix");
  CHECK(p0.strides() == Shape{9 * 20, 20, 5, 1});  // batch-strided: images 9 channels apart
  Tensor<float> p1 = buf.append(x1);
  Tensor<float> p2 = buf.append(x2.permute({0, 1, 3, 2}).contiguous().permute({0, 1, 3, 2}));  // a strided x
  CHECK(buf.filled() == 9);
  CHECK(p1.storage().is_alias_of(p0.storage()));  // one buffer, no copies of earlier channels
  CHECK(p2.storage().is_alias_of(p0.storage()));
  CHECK(p2.is_contiguous());  // the full buffer
  require_equal(p0, x0, "the first prefix is untouched by later appends");
  require_equal(p1, concat({x0, x1}, 1), "second prefix");
  require_equal(p2, concat({x0, x1, x2}, 1), "third prefix");
}

TEST_CASE("DenseBuffer: append rejects what does not fit, with the shapes in the message") {
  auto x = zeros<float>({2, 3, 4, 5});
  DenseBuffer<float> buf(x, 5);
  buf.append(x);
  REQUIRE_THROWS_WITH(buf.append(x), Catch::Contains("3 more channels do not fit: 3 of 5 are filled"));
  REQUIRE_THROWS_WITH(buf.append(zeros<float>({2, 1, 4, 4})), Catch::Contains("expected x of shape (2, C, 4, 5)"));
  REQUIRE_THROWS_WITH(buf.append(zeros<float>({2, 1, 20})), Catch::Contains("got [2, 1, 20]"));
  REQUIRE_THROWS_WITH(DenseBuffer<float>(zeros<float>({2, 3}), 5), Catch::Contains("expected an (N, C, H, W)"));
}

TEST_CASE("DenseBuffer gradcheck: prefixes feeding a depthwise conv, a norm and the loss, weights too") {
  Generator gen(2);
  // a dense stage in miniature: every prefix feeds a later op, the last prefix is the output;
  // the depthwise conv and layer_norm2d read the batch-strided prefixes in place
  auto x0 = randn<double>({2, 3, 5, 4}, gen), w = randn<double>({3, 1, 3, 3}, gen), b = randn<double>({3}, gen);
  auto lw = randn<double>({5}, gen), s = randn<double>({1, 7, 1, 1}, gen);
  dgtest::require_gradcheck(
      [](const std::vector<Tensor<double>>& in) {
        DenseBuffer<double> buf(in[0], 7);
        Tensor<double> p0 = buf.append(in[0]);
        Tensor<double> p1 = buf.append(sigmoid(conv2d(p0, in[1], in[2], 1, 1, 1, 3)).narrow(1, 0, 2));  // (2, 5, 5, 4)
        Tensor<double> p2 = buf.append(layer_norm2d(p1, in[3]).narrow(1, 1, 2));                    // (2, 7, 5, 4)
        return sum(p2 * p2 * in[4]) + sum(p1) + sum(p0 * p0);
      },
      {x0.requires_grad_(), w.requires_grad_(), b.requires_grad_(), lw.requires_grad_(), s.requires_grad_()});
}

TEST_CASE("DenseBuffer matches concat bit for bit, forward and backward, and works without recording") {
  Generator gen(3);
  auto w = randn<float>({5, 1, 7, 7}, gen);
  auto run = [&](bool buffer, Tensor<float> x) {
    x = x.detach().requires_grad_();
    Tensor<float> out;
    if (buffer) {
      DenseBuffer<float> buf(x, 10);
      Tensor<float> p = buf.append(x);
      p = buf.append(conv2d(p, w, Tensor<float>(), 1, 3, 1, 5));
      out = p;
    } else {
      out = concat({x, conv2d(x, w, Tensor<float>(), 1, 3, 1, 5)}, 1);
    }
    sum(out * out).backward();
    return std::make_pair(out.detach(), x.grad());
  };
  auto x = randn<float>({3, 5, 9, 8}, gen);
  auto [yb, gb] = run(true, x);
  auto [yc, gc] = run(false, x);
  require_equal(yb, yc, "forward");
  require_equal(gb, gc, "dx");
  NoGradGuard no_grad;
  DenseBuffer<float> buf(x, 5);
  CHECK_FALSE(buf.append(x).requires_grad());
}

// ---------------------------------------------------------------- fast kernels on batch-strided views

namespace {
struct ConvCase {
  Shape x, w;
  Pair2 stride = 1, padding = 0, dilation = 1;
  int64_t groups = 1;
};
}  // namespace

TEMPLATE_TEST_CASE("conv2d fast CPU kernels read batch-strided x and dout in place and match the ref kernels", "",
                   float, double, bfloat16) {
  using T = TestType;
  Generator gen(4);
  // every kernel path: depthwise padded-plane sweep (k7 p3, RDNet's), depthwise direct (stride
  // 2; padding past the kernel's reach), GEMM with im2col, pointwise GEMM, pointwise folded on
  // small maps, grouped; odd sizes, batch 1
  std::vector<ConvCase> cases{
      {{3, 5, 7, 7}, {5, 1, 7, 7}, 1, 3, 1, 5},   {{1, 3, 14, 13}, {3, 1, 7, 7}, 1, 3, 1, 3},
      {{2, 17, 3, 3}, {17, 1, 7, 7}, 1, 3, 1, 17}, {{3, 7, 9, 9}, {7, 1, 3, 3}, 2, 2, 2, 7},
      {{2, 3, 6, 6}, {3, 1, 3, 3}, 1, 3, 1, 3},    {{3, 7, 17, 17}, {5, 7, 3, 3}, 1, 1},
      {{3, 7, 7, 7}, {11, 7, 1, 1}},               {{41, 7, 3, 3}, {5, 7, 1, 1}},
      {{3, 6, 9, 9}, {9, 2, 3, 3}, 2, 1, 1, 3},    {{3, 4, 8, 8}, {6, 4, 2, 2}, 2}};
  for (const ConvCase& c : cases) {
    Shape bs{c.w[0]};
    const Conv2dGeometry g = conv2d_geometry(c.x, c.w, &bs, c.stride, c.padding, c.dilation, c.groups);
    INFO("x " << shape_str(c.x) << " w " << shape_str(c.w) << " groups " << c.groups);
    Tensor<T> x = batch_strided<T>(c.x, 2, 5, gen), dout = batch_strided<T>(g.out_shape(), 1, 3, gen);
    Tensor<T> w = randn<T>(c.w, gen), b = randn<T>(bs, gen);
    REQUIRE(cpu::batch_stride(x) == (c.x[0] == 1 ? c.x[1] : c.x[1] + 5) * c.x[2] * c.x[3]);
    REQUIRE(x.is_contiguous() == (c.x[0] == 1));
    Tensor<T> xc = x.contiguous(), dc = dout.contiguous();
    // the view and its contiguous copy: the same sums in the same order
    require_equal(cpu::conv2d_forward(x, w, b, g), cpu::conv2d_forward(xc, w, b, g), "forward, view vs copy");
    require_equal(cpu::conv2d_backward_input(dout, w, g), cpu::conv2d_backward_input(dc, w, g), "dx, view vs copy");
    require_equal(cpu::conv2d_backward_weight(dout, x, g), cpu::conv2d_backward_weight(dc, xc, g),
                  "dweight, view vs copy");
    require_equal(cpu::conv2d_backward_bias(dout, g), cpu::conv2d_backward_bias(dc, g), "dbias, view vs copy");
    // and the ref kernels, which index every stride, on the view itself
    close_to_ref(cpu::conv2d_forward(x, w, b, g), ref::conv2d_forward(x, w, b, g), "forward");
    close_to_ref(cpu::conv2d_backward_input(dout, w, g), ref::conv2d_backward_input(dout, w, g), "dx");
    close_to_ref(cpu::conv2d_backward_weight(dout, x, g), ref::conv2d_backward_weight(dout, x, g), "dweight");
    close_to_ref(cpu::conv2d_backward_bias(dout, g), ref::conv2d_backward_bias(dout, g), "dbias");
  }
}

TEMPLATE_TEST_CASE("layer_norm2d fast CPU kernels read batch-strided x and dy in place and match the ref kernels", "",
                   float, double, bfloat16) {
  using T = TestType;
  Generator gen(5);
  for (Shape s : {Shape{3, 5, 7, 7}, Shape{1, 17, 3, 1}, Shape{2, 3, 17, 19}, Shape{3, 2, 4, 4}}) {
    INFO(shape_str(s));
    Tensor<T> x = batch_strided<T>(s, 1, 4, gen), dy = batch_strided<T>(s, 3, 3, gen);
    Tensor<T> w = randn<T>({s[1]}, gen), b = randn<T>({s[1]}, gen);
    auto fast = cpu::layer_norm2d_forward(x, w, b, 1e-6);
    auto copy = cpu::layer_norm2d_forward(x.contiguous(), w, b, 1e-6);
    auto ref = ref::layer_norm2d_forward(x, w, b, 1e-6);
    require_equal(fast.y, copy.y, "y, view vs copy");
    close_to_ref(fast.y, ref.y, "y");
    auto gf = cpu::layer_norm2d_backward(dy, x, fast.mean, fast.rstd, w, true, true, true);
    auto gc = cpu::layer_norm2d_backward(dy.contiguous(), x.contiguous(), fast.mean, fast.rstd, w, true, true, true);
    auto gr = ref::layer_norm2d_backward(dy, x, fast.mean, fast.rstd, w, true, true, true);
    require_equal(gf.dx, gc.dx, "dx, view vs copy");
    require_equal(gf.dweight, gc.dweight, "dweight, view vs copy");
    require_equal(gf.dbias, gc.dbias, "dbias, view vs copy");
    // dx subtracts two channel means from dy * w: allow the cancellation ten steps of rounding
    const double rtol = std::is_same_v<T, double> ? 1e-12 : std::is_same_v<T, float> ? 1e-5 : 1e-2;
    dgtest::require_close(gf.dx, gr.dx, rtol, std::is_same_v<T, bfloat16> ? 0.2 : 10 * rtol, "dx");
    close_to_ref(gf.dweight, gr.dweight, "dweight");
    close_to_ref(gf.dbias, gr.dbias, "dbias");
  }
}

// ---------------------------------------------------------------- checkpoint

namespace {
/// A small block with parameters and drop path (random): conv -> layer_norm2d -> gelu -> drop_path.
struct TinyBlock {
  Tensor<double> w, lw;
  explicit TinyBlock(Generator& gen) {
    w = randn<double>({4, 1, 3, 3}, gen).requires_grad_();
    lw = randn<double>({4}, gen).requires_grad_();
  }
  Tensor<double> operator()(const Tensor<double>& x) const {
    Tensor<double> h = gelu(layer_norm2d(conv2d(x, w, Tensor<double>(), 1, 1, 1, 4), lw));
    return drop_path(h, 0.5, true, default_generator());
  }
};
}  // namespace

TEST_CASE("checkpoint: same output, input and parameter gradients, and random stream as running fn directly") {
  Generator gen(6);
  TinyBlock block(gen);
  auto x0 = randn<double>({6, 4, 5, 5}, gen);
  auto run = [&](bool ckpt) {
    manual_seed(42);
    block.w.zero_grad();
    block.lw.zero_grad();
    Tensor<double> x = x0.detach().requires_grad_();
    Tensor<double> y = ckpt ? checkpoint([&](const auto& in) { return block(in[0] * 2.0); }, {x}) : block(x * 2.0);
    sum(y * y).backward();
    const uint64_t next = default_generator().next_u64();  // where the stream is after backward
    return std::make_tuple(y.detach(), x.grad(), block.w.grad(), block.lw.grad(), next);
  };
  auto [y0, dx0, dw0, dl0, r0] = run(false);
  auto [y1, dx1, dw1, dl1, r1] = run(true);
  require_equal(y1, y0, "output");
  require_equal(dx1, dx0, "dx");
  require_equal(dw1, dw0, "dweight (summed once)");
  require_equal(dl1, dl0, "norm weight");
  CHECK(r1 == r0);
  // some samples were dropped, some kept: the replayed masks matter
  auto v = y0.sum({1, 2, 3}).to_vector();
  CHECK(std::count(v.begin(), v.end(), 0.0) > 0);
  CHECK(std::count(v.begin(), v.end(), 0.0) < static_cast<long>(v.size()));
}

TEST_CASE("checkpoint keeps one node on the tape instead of the ops inside") {
  Generator gen(7);
  TinyBlock block(gen);
  auto x = randn<double>({2, 4, 5, 5}, gen).requires_grad_();
  const size_t before = autograd::Tape::current().live_nodes();
  Tensor<double> y = checkpoint([&](const auto& in) { return block(in[0]); }, {x});
  CHECK(autograd::Tape::current().live_nodes() == before + 1);
  CHECK(y.grad_fn_name() == "checkpoint");
  Tensor<double> z = block(x);
  CHECK(autograd::Tape::current().live_nodes() >= before + 4);
}

TEST_CASE("checkpoint gradcheck: two inputs, a parameter passed as an input, fn using one input twice") {
  Generator gen(8);
  auto a = randn<double>({2, 3, 4, 4}, gen), b = randn<double>({2, 3, 4, 4}, gen), w = randn<double>({3, 1, 3, 3}, gen);
  dgtest::require_gradcheck(
      [](const std::vector<Tensor<double>>& in) {
        Tensor<double> y = checkpoint(
            [](const std::vector<Tensor<double>>& v) { return conv2d(v[0] * v[1], v[2], {}, 1, 1, 1, 3) + v[0]; },
            in);
        return sum(y * y);
      },
      {a.requires_grad_(), b.requires_grad_(), w.requires_grad_()});
}

TEST_CASE("checkpoint: a parameter used inside and outside fn sums both gradients, no-grad and no-input cases") {
  Generator gen(9);
  auto w = randn<double>({3}, gen).requires_grad_();
  auto x = randn<double>({3}, gen).requires_grad_();
  auto fn = [&](const std::vector<Tensor<double>>& in) { return in[0] * w; };
  Tensor<double> y = checkpoint(fn, {x}) + w * 3.0;
  sum(y).backward();
  require_equal(w.grad(), x.detach() + 3.0, "dw from inside and outside");
  require_equal(x.grad(), w.detach(), "dx");
  w.zero_grad();
  {  // no input requires grad: fn runs recorded as usual, w still gets its gradient
    Tensor<double> c = randn<double>({3}, gen);
    sum(checkpoint(fn, {c})).backward();
    require_equal(w.grad(), c, "dw with a constant input");
  }
  NoGradGuard no_grad;
  CHECK_FALSE(checkpoint(fn, {x}).requires_grad());
}

// ---------------------------------------------------------------- RDNet: naive, buffer, buffer + recompute

namespace {
rdnet::RDNetConfig tiny_test_config(bool dense_buffer, bool memory_efficient, bool recompute_depthwise = true) {
  rdnet::RDNetConfig c;
  c.in_chans = 3;
  c.num_classes = 5;
  c.growth_rates = {8, 16, 16};
  c.num_blocks_list = {3, 2, 2};
  c.block_type = {"Block", "BlockESE", "BlockESE"};
  c.is_downsample_block = {false, true, false};
  c.num_init_features = 16;
  c.patch_size = 2;
  c.ls_init_value = 0.5;    // block outputs matter for the gradients (1e-6 would hide them)
  c.drop_path_rate = 0.5;   // stochastic depth on: the recomputation must replay it
  c.proj_drop_rate = 0.1;   // and dropout after every block
  c.dense_buffer = dense_buffer;
  c.memory_efficient = memory_efficient;
  c.recompute_depthwise = recompute_depthwise;
  return c;
}

struct StepResult {
  Tensor<float> logits, loss;
  std::vector<std::pair<std::string, Tensor<float>>> grads;
  uint64_t rng_after;
};

StepResult train_step(bool dense_buffer, bool memory_efficient, const Tensor<float>& x, const Tensor<int64_t>& y,
                      bool recompute_depthwise = true) {
  manual_seed(1);  // layers draw their default init from it before init_weights(init) runs
  Generator init(123);
  rdnet::RDNet<float> model(tiny_test_config(dense_buffer, memory_efficient, recompute_depthwise), init);
  model.train();
  manual_seed(7);
  StepResult r;
  r.logits = model.forward(x);
  r.loss = cross_entropy(r.logits, y, 0.1);
  r.loss.backward();
  r.rng_after = default_generator().next_u64();
  for (auto& [name, p] : model.named_parameters()) r.grads.emplace_back(name, p.grad());
  return r;
}
}  // namespace

TEST_CASE("RDNet: naive concat, shared buffer, buffer + recomputation and a kept depthwise output give the same "
          "logits and gradients") {
  Generator gen(10);
  Tensor<float> x = randn<float>({4, 3, 14, 14}, gen);  // 7x7 and 3x3 maps: planes at odd addresses
  Tensor<int64_t> y = tensor<int64_t>({0, 3, 1, 4});
  StepResult naive = train_step(false, false, x, y), buffer = train_step(true, false, x, y),
             recompute = train_step(true, true, x, y), naive_recompute = train_step(false, true, x, y),
             keep_depthwise = train_step(true, false, x, y, /*recompute_depthwise=*/false);
  for (const StepResult* r : {&buffer, &recompute, &naive_recompute, &keep_depthwise}) {
    // same ops on the same values in the same order: bit for bit, every parameter's gradient
    require_equal(r->logits, naive.logits, "logits");
    require_equal(r->loss, naive.loss, "loss");
    CHECK(r->rng_after == naive.rng_after);
    REQUIRE(r->grads.size() == naive.grads.size());
    for (size_t i = 0; i < naive.grads.size(); ++i) require_equal(r->grads[i].second, naive.grads[i].second, naive.grads[i].first);
  }
  // drop path and dropout really were on: another seed gives other logits
  manual_seed(1);
  Generator init(123);
  rdnet::RDNet<float> model(tiny_test_config(true, false), init);
  model.train();
  manual_seed(8);
  CHECK(model.forward(x).to_vector() != naive.logits.to_vector());
}

TEST_CASE("RDNet memory_efficient: switching train/eval between forward and backward is an error") {
  Generator init(1);
  rdnet::RDNet<float> model(tiny_test_config(true, true), init);
  model.train();
  Tensor<float> loss = sum(model.forward(zeros<float>({2, 3, 8, 8})));
  model.eval();
  REQUIRE_THROWS_WITH(loss.backward(), Catch::Contains("train/eval mode changed"));
}

TEST_CASE("DenseStage gradcheck in double through the shared buffer, with and without recomputation") {
  for (bool memory_efficient : {false, true}) {
    INFO("memory_efficient " << memory_efficient);
    // 3 input channels, 3 blocks of growth 2 (the last ESE), layer scale 0.5, no drop path
    auto stage = std::make_shared<rdnet::DenseStage<double>>(3, 3, std::vector<double>{0, 0, 0}, 2, 4.0, 0.0, true,
                                                              0.5, 1e-6, true, memory_efficient);
    Generator gen(11);
    for (auto& p : stage->parameters()) {
      NoGradGuard g;
      p.copy_(randn<double>(p.shape(), gen, 0.0, 0.5));
    }
    auto x = randn<double>({2, 3, 4, 3}, gen);
    dgtest::require_gradcheck([&](const std::vector<Tensor<double>>& in) { return stage->forward(in[0]); },
                              {x.requires_grad_()});
  }
}

}  // namespace test_dense

// tests/test_tensor.cpp: the core Tensor<T>: factories, random numbers, dtype conversion
// (bfloat16 rounding against torch's bits), printing, and views: what they alias, their
// strides, and the errors for bad dims and shapes. Gradients of views are in test_shape.cpp.
#include "test_util.hpp"

#include <cmath>
#include <limits>
#include <vector>

namespace test_tensor {

using namespace dg;
using Catch::Contains;

namespace {
template <class T>
std::vector<double> values(const Tensor<T>& t) {
  std::vector<double> r;
  for (T v : t.to_vector()) r.push_back(static_cast<double>(static_cast<acc_t<T>>(v)));
  return r;
}
}  // namespace

TEST_CASE("zeros, ones, full and scalar_tensor fill every element", "[tensor]") {
  auto z = zeros<float>({2, 3});
  auto o = ones<double>({4});
  auto f = full<bfloat16>({3, 1, 2}, bfloat16(2.5f));
  auto s = scalar_tensor<float>(7.f);
  CHECK(z.shape() == Shape{2, 3});
  CHECK(z.is_contiguous());
  CHECK(values(z) == std::vector<double>(6, 0.0));
  CHECK(values(o) == std::vector<double>(4, 1.0));
  CHECK(values(f) == std::vector<double>(6, 2.5));
  CHECK(s.dim() == 0);
  CHECK(s.numel() == 1);
  CHECK(s.item() == 7.f);
  auto e = zeros<float>({2, 0, 3});  // zero-size tensors are allowed, like torch
  CHECK(e.numel() == 0);
  CHECK(e.to_vector().empty());
  CHECK(e.is_contiguous());  // no elements: contiguous whatever the strides, like torch
  CHECK(e.view({0, 3}).shape() == Shape{0, 3});
  CHECK(e.reshape({-1, 6}).shape() == Shape{0, 6});
  REQUIRE_THROWS_WITH(zeros<float>({2, -1}), Contains("negative dimension"));
  // No elements, but strides past int64: refused instead of overflowing
  const int64_t big = int64_t(1) << 62;
  REQUIRE_THROWS_WITH(zeros<float>({0, big, big}), Contains("strides overflow int64"));
  REQUIRE_THROWS_WITH(zeros<float>({big, big}), Contains("more than 2^63 elements"));
  CHECK(zeros<float>({0, big}).numel() == 0);  // its strides fit: allowed, like torch
}

TEST_CASE("arange with integer, negative and fractional steps matches torch.arange", "[tensor]") {
  CHECK(values(arange<float>(5)) == std::vector<double>{0, 1, 2, 3, 4});
  CHECK(values(arange<double>(1.0, -2.0, -0.5)) == std::vector<double>{1, 0.5, 0, -0.5, -1, -1.5});
  CHECK(values(arange<double>(0.5, 2.6, 0.5)) == std::vector<double>{0.5, 1.0, 1.5, 2.0, 2.5});
  // torch.arange(0, 1, 0.3, dtype=float32) -> [0, 0.3, 0.6, 0.9] rounded to float
  auto a = arange<float>(0.0, 1.0, 0.3);
  REQUIRE(a.numel() == 4);
  CHECK(a.at({3}) == 0.9f);
  CHECK(arange<float>(3.0, 1.0).numel() == 0);  // empty range, not an error
  CHECK(arange<double>(0.0, 1.0, 0.25).numel() == 4);  // end excluded
  REQUIRE_THROWS_WITH(arange<float>(0.0, 1.0, 0.0), Contains("step must be non-zero"));
}

TEST_CASE("tensor from a vector keeps C order and checks the count", "[tensor]") {
  auto t = tensor<double>({1, 2, 3, 4, 5, 6}, {2, 3});
  CHECK(t.shape() == Shape{2, 3});
  CHECK(t.at({1, 0}) == 4.0);
  CHECK(t.at({-1, -1}) == 6.0);  // negative indices count from the end
  CHECK(tensor<float>({1, 2, 3}).shape() == Shape{3});
  REQUIRE_THROWS_WITH(tensor<float>({1, 2, 3}, {2, 2}), Contains("3 values do not fill shape [2, 2]"));
  REQUIRE_THROWS_WITH(t.at({2, 0}), Contains("out of range for dim 0 of size 2"));
  REQUIRE_THROWS_WITH(t.at({0}), Contains("tensor has 2 dims"));
  REQUIRE_THROWS_WITH(t.item(), Contains("one element"));
  REQUIRE_THROWS_WITH(Tensor<float>().shape(), Contains("undefined tensor"));
}

TEST_CASE("rand and randn are reproducible from a seed and have the right moments", "[tensor][random]") {
  Generator g1(42), g2(42), g3(43);
  auto a = randn<float>({5, 7}, g1), b = randn<float>({5, 7}, g2), c = randn<float>({5, 7}, g3);
  CHECK(a.to_vector() == b.to_vector());
  CHECK(a.to_vector() != c.to_vector());
  g1.manual_seed(42);  // reseeding restarts the stream (and drops Box-Muller's spare value)
  CHECK(randn<float>({5, 7}, g1).to_vector() == a.to_vector());

  const int64_t n = 200000;
  Generator g(7);
  auto r = randn<double>({n}, g, 2.0, 3.0);
  double m = r.mean().item(), var = mean(pow(r - m, 2.0)).item();
  CHECK(m == Approx(2.0).margin(0.03));  // 5 standard errors: 3 / sqrt(2e5) = 0.0067
  CHECK(std::sqrt(var) == Approx(3.0).margin(0.03));
  auto u = rand<double>({n}, g, -1.0, 3.0);
  CHECK(u.max().item() < 3.0);
  CHECK(-u.max().item() <= 1.0);
  CHECK((-u).max().item() <= 1.0);  // all >= -1
  CHECK(u.mean().item() == Approx(1.0).margin(0.02));
  CHECK(mean(pow(u - 1.0, 2.0)).item() == Approx(16.0 / 12.0).margin(0.02));  // (b-a)^2/12
}

TEST_CASE("bfloat16 rounding matches torch's bits", "[tensor][dtype]") {
  // expected bits from torch.tensor(v, dtype=torch.float32).to(torch.bfloat16).view(torch.int16)
  struct Case { float v; uint16_t bits; };
  const Case cases[] = {
      {1.0f, 0x3f80},          {1.00390625f, 0x3f80},  // exact tie: rounds to the even 0x3f80
      {1.005859375f, 0x3f81},  {1.01171875f, 0x3f82},  // tie between 0x3f81 and 0x3f82: even is up
      {1.017578125f, 0x3f82},  {3.14159265f, 0x4049},  {-2.71828f, 0xc02e}, {0.1f, 0x3dcd},
      {65504.f, 0x4780},       {1e-40f, 0x0001},       {3.3895e38f, 0x7f7f}, {-0.0f, 0x8000},
      {3.4028235e38f, 0x7f80},  // FLT_MAX rounds up to +inf
      {std::numeric_limits<float>::infinity(), 0x7f80},
  };
  for (const auto& c : cases) {
    INFO("value " << c.v);
    CHECK(bfloat16(c.v).bits == c.bits);
  }
  CHECK(std::isnan(float(bfloat16(std::numeric_limits<float>::quiet_NaN()))));
  CHECK(std::isnan(float(bfloat16(-std::numeric_limits<float>::quiet_NaN()))));
  // every bfloat16 converts to float and back unchanged
  for (uint32_t b = 0; b < 0x10000; b += 7) {
    bfloat16 h = bfloat16::from_bits(static_cast<uint16_t>(b));
    if (!std::isnan(float(h))) REQUIRE(bfloat16(float(h)).bits == h.bits);
  }
}

TEST_CASE("dtype conversion between float, double and bfloat16", "[tensor][dtype]") {
  auto d = tensor<double>({1.5, -2.25, 0.1, 100.7, 1e-3}, {5});
  auto f = d.to<float>();
  auto h = d.to<bfloat16>();
  CHECK(f.dtype() == DType::Float32);
  CHECK(h.dtype() == DType::BFloat16);
  CHECK(values(f) == std::vector<double>{1.5, -2.25, double(0.1f), double(100.7f), double(1e-3f)});
  // torch: torch.tensor([...], dtype=float64).to(bfloat16) -> 1.5, -2.25, 0.10009765625, 100.5, ...
  auto hv = values(h);
  CHECK(hv[0] == 1.5);
  CHECK(hv[1] == -2.25);
  CHECK(hv[2] == 0.10009765625);
  CHECK(hv[3] == 100.5);
  CHECK(h.to<double>().to<float>().to_vector() == h.to<float>().to_vector());
  CHECK(values(f.to<double>()) == values(f));  // widening is exact
  // conversion reads through strides: a transposed view converts in logical order
  auto m = arange<float>(6).reshape({2, 3}).transpose(0, 1);
  CHECK(values(m.to<double>()) == std::vector<double>{0, 3, 1, 4, 2, 5});
  CHECK(values(d.to<int64_t>()) == std::vector<double>{1, -2, 0, 100, 0});  // truncation, like torch
}

TEST_CASE("printing shows dtype, shape and values, abbreviated when long", "[tensor]") {
  auto t = tensor<float>({1, 2, 3, 4, 5, 6}, {2, 3});
  std::string s = t.str();
  CHECK_THAT(s, Contains("Tensor<float> [2, 3]"));
  CHECK_THAT(s, Contains("[[1, 2, 3],"));
  CHECK_THAT(s, Contains("[4, 5, 6]]"));
  t.requires_grad_();
  CHECK_THAT(t.str(), Contains("requires_grad"));
  std::string long_s = arange<double>(100).str();
  CHECK_THAT(long_s, Contains("Tensor<double> [100]"));
  CHECK_THAT(long_s, Contains("[0, 1, 2, ..., 97, 98, 99]"));
  CHECK_THAT(scalar_tensor<bfloat16>(bfloat16(0.5f)).str(), Contains("Tensor<bfloat16> []\n0.5"));
  std::ostringstream os;
  os << zeros<float>({1, 0});
  CHECK_THAT(os.str(), Contains("[1, 0]"));
  CHECK(Tensor<float>().str() == "Tensor<undefined>");
}

TEST_CASE("reshape and view alias their base, writes through them show in the base", "[tensor][view]") {
  auto x = arange<float>(12);
  auto v = x.view({3, 4});
  CHECK(v.storage().is_alias_of(x.storage()));
  CHECK(v.shape() == Shape{3, 4});
  CHECK(v.strides() == Shape{4, 1});
  {
    NoGradGuard g;
    v.select(0, 1).fill_(-1.f);
  }
  CHECK(x.at({5}) == -1.f);
  CHECK(x.reshape({2, -1, 2}).shape() == Shape{2, 3, 2});  // -1 is inferred
  CHECK(x.reshape({2, -1, 2}).storage().is_alias_of(x.storage()));
  // reshape of a non-contiguous view must copy; view refuses
  auto t = v.transpose(0, 1);
  auto r = t.reshape({12});
  CHECK_FALSE(r.storage().is_alias_of(x.storage()));
  CHECK(values(r) == std::vector<double>{0, -1, 8, 1, -1, 9, 2, -1, 10, 3, -1, 11});
  REQUIRE_THROWS_WITH(t.view({12}), Contains("not contiguous"));
  REQUIRE_THROWS_WITH(x.view({5, -1}), Contains("shape [5, -1] is invalid for input of shape [12]"));
  REQUIRE_THROWS_WITH(x.reshape({-1, -1}), Contains("only one dimension can be -1"));
  REQUIRE_THROWS_WITH(x.view({3, 5}), Contains("invalid for input of shape [12]"));
}

TEST_CASE("permute and transpose are non-contiguous views with permuted strides", "[tensor][view]") {
  auto x = arange<double>(24).reshape({2, 3, 4});
  auto p = x.permute({2, 0, 1});
  CHECK(p.shape() == Shape{4, 2, 3});
  CHECK(p.strides() == Shape{1, 12, 4});
  CHECK_FALSE(p.is_contiguous());
  CHECK(p.storage().is_alias_of(x.storage()));
  for (int64_t i = 0; i < 4; ++i)
    for (int64_t j = 0; j < 2; ++j)
      for (int64_t k = 0; k < 3; ++k) REQUIRE(p.at({i, j, k}) == x.at({j, k, i}));
  auto t = x.transpose(-1, 0);
  CHECK(t.shape() == Shape{4, 3, 2});
  CHECK(t.at({3, 1, 1}) == x.at({1, 1, 3}));
  auto c = p.contiguous();
  CHECK(c.is_contiguous());
  CHECK_FALSE(c.storage().is_alias_of(x.storage()));
  CHECK(c.to_vector() == p.to_vector());
  CHECK(x.contiguous().storage().is_alias_of(x.storage()));  // already contiguous: no copy
  REQUIRE_THROWS_WITH(x.permute({0, 1}), Contains("permute: got 2 dims [0, 1] for a 3-D tensor"));
  REQUIRE_THROWS_WITH(x.permute({0, 1, 1}), Contains("repeated"));
  REQUIRE_THROWS_WITH(x.transpose(0, 3), Contains("transpose: dim 3 out of range for a 3-D tensor"));
}

TEST_CASE("narrow, slice and select are views, writing through them changes the base", "[tensor][view]") {
  auto x = arange<float>(20).reshape({4, 5});
  auto n = x.narrow(1, 1, 3);
  CHECK(n.shape() == Shape{4, 3});
  CHECK(n.offset() == 1);
  CHECK(n.storage().is_alias_of(x.storage()));
  CHECK_FALSE(n.is_contiguous());
  auto s = x.select(0, -1);
  CHECK(s.shape() == Shape{5});
  CHECK(values(s) == std::vector<double>{15, 16, 17, 18, 19});
  {
    NoGradGuard g;
    n.fill_(0.f);
    s.copy_(scalar_tensor<float>(9.f));  // broadcast copy into a view
  }
  CHECK(values(x.select(0, 0)) == std::vector<double>{0, 0, 0, 0, 4});
  CHECK(values(x.select(0, 3)) == std::vector<double>{9, 9, 9, 9, 9});
  CHECK(x.narrow(0, 1, 0).numel() == 0);
  REQUIRE_THROWS_WITH(x.narrow(1, 3, 3), Contains("narrow: window [3, 6) is outside dim 1 of size 5"));
  REQUIRE_THROWS_WITH(x.select(1, 5), Contains("select: index 5 out of range for dim 1 of size 5"));
  REQUIRE_THROWS_WITH(x.select(2, 0), Contains("select: dim 2 out of range"));
}

TEST_CASE("slice with a step and Python-style bounds", "[tensor][view]") {
  auto x = arange<double>(10);
  CHECK(values(x.slice(0, 1, 8, 3)) == std::vector<double>{1, 4, 7});
  CHECK(x.slice(0, 1, 8, 3).strides() == Shape{3});
  CHECK(values(x.slice(0, -3, 10)) == std::vector<double>{7, 8, 9});  // negative start counts from the end
  CHECK(values(x.slice(0, 0, -7, 2)) == std::vector<double>{0, 2});
  CHECK(values(x.slice(0, 8, 100)) == std::vector<double>{8, 9});   // clamped like Python
  CHECK(x.slice(0, 6, 2).numel() == 0);                              // empty, not an error
  auto m = arange<double>(24).reshape({4, 6});
  auto v = m.slice(1, 1, 6, 2).slice(0, 0, 4, 3);  // m[0:4:3, 1:6:2]
  CHECK(v.shape() == Shape{2, 3});
  CHECK(values(v) == std::vector<double>{1, 3, 5, 19, 21, 23});
  REQUIRE_THROWS_WITH(x.slice(0, 0, 5, 0), Contains("step must be positive"));
  REQUIRE_THROWS_WITH(x.slice(0, 0, 5, -1), Contains("step must be positive, got -1"));
}

TEST_CASE("expand repeats size-1 dims with stride 0 and aliases its input", "[tensor][view]") {
  auto x = tensor<float>({1, 2, 3}, {3, 1});
  auto e = x.expand({2, 3, 4});
  CHECK(e.shape() == Shape{2, 3, 4});
  CHECK(e.strides() == Shape{0, 1, 0});
  CHECK(e.storage().is_alias_of(x.storage()));
  CHECK(e.at({1, 2, 3}) == 3.f);
  CHECK(x.expand({-1, 5}).shape() == Shape{3, 5});
  {
    NoGradGuard g;
    x.fill_(4.f);
  }
  CHECK(values(e) == std::vector<double>(24, 4.0));  // the view sees the write
  CHECK(values(e.contiguous()) == std::vector<double>(24, 4.0));
  REQUIRE_THROWS_WITH(x.expand({3, 4, 2}), Contains("expand: input [3, 1] cannot expand to [3, 4, 2]"));
  REQUIRE_THROWS_WITH(x.expand({4}), Contains("has fewer dims than input"));
}

TEST_CASE("unsqueeze, squeeze and flatten", "[tensor][view]") {
  auto x = arange<float>(6).reshape({2, 3});
  CHECK(x.unsqueeze(0).shape() == Shape{1, 2, 3});
  CHECK(x.unsqueeze(-1).shape() == Shape{2, 3, 1});
  CHECK(x.unsqueeze(1).shape() == Shape{2, 1, 3});
  CHECK(x.unsqueeze(1).is_contiguous());
  CHECK(x.unsqueeze(1).squeeze(1).shape() == Shape{2, 3});
  CHECK(x.squeeze(0).shape() == Shape{2, 3});  // size 2: unchanged, like torch
  CHECK(x.unsqueeze(2).storage().is_alias_of(x.storage()));
  auto y = arange<float>(24).reshape({2, 3, 4});
  CHECK(y.flatten().shape() == Shape{24});
  CHECK(y.flatten(1).shape() == Shape{2, 12});
  CHECK(y.flatten(0, 1).shape() == Shape{6, 4});
  CHECK(scalar_tensor<float>(1.f).flatten().shape() == Shape{1});
  auto yt = y.transpose(0, 2).flatten(1);  // non-contiguous: a copy in logical order
  CHECK(yt.shape() == Shape{4, 6});
  CHECK(yt.at({1, 1}) == y.at({1, 0, 1}));  // yt[i, 2 j + k] = y[k, j, i]
  CHECK(yt.at({1, 3}) == y.at({1, 1, 1}));
  CHECK(yt.at({3, 4}) == y.at({0, 2, 3}));
  REQUIRE_THROWS_WITH(x.unsqueeze(3), Contains("unsqueeze: dim 3 out of range for a 3-D tensor"));
  REQUIRE_THROWS_WITH(y.flatten(2, 1), Contains("flatten: start_dim 2 comes after end_dim 1"));
}

TEST_CASE("non-contiguous views read and write correctly through every kind of stride", "[tensor][view]") {
  // x[::2, 1:, :].permute(2, 0, 1) then expand a size-1 dim: offset, stepped, permuted, zero strides
  auto x = arange<double>(5 * 4 * 3).reshape({5, 4, 3});
  auto v = x.slice(0, 0, 5, 2).slice(1, 1, 4).permute({2, 0, 1}).unsqueeze(0).expand({2, 3, 3, 3});
  CHECK(v.shape() == Shape{2, 3, 3, 3});
  for (int64_t r = 0; r < 2; ++r)
    for (int64_t c = 0; c < 3; ++c)
      for (int64_t i = 0; i < 3; ++i)
        for (int64_t j = 0; j < 3; ++j) REQUIRE(v.at({r, c, i, j}) == x.at({2 * i, j + 1, c}));
  auto vc = v.contiguous();
  CHECK(vc.to_vector() == v.to_vector());
  // copy_ between two overlapping views of one storage goes through a temporary
  auto a = arange<float>(6);
  {
    NoGradGuard g;
    a.slice(0, 1, 6).copy_(a.slice(0, 0, 5));
  }
  CHECK(values(a) == std::vector<double>{0, 0, 1, 2, 3, 4});
}

TEST_CASE("storage is shared by views and freed with the last one", "[tensor][view]") {
  auto x = zeros<float>({4, 4});
  CHECK(x.storage().use_count() == 1);
  {
    auto a = x.transpose(0, 1), b = x.slice(0, 1, 3), c = a.detach();
    CHECK(x.storage().use_count() == 4);
    CHECK(c.storage().is_alias_of(x.storage()));
    CHECK_FALSE(x.clone().storage().is_alias_of(x.storage()));
  }
  CHECK(x.storage().use_count() == 1);
  CHECK(x.storage().nbytes() == 16 * sizeof(float));
}

TEST_CASE("dims out of range name the op and the valid range", "[tensor][errors]") {
  auto x = zeros<float>({2, 3});
  REQUIRE_THROWS_WITH(x.size(2), Contains("size: dim 2 out of range for a 2-D tensor (expected in [-2, 1])"));
  REQUIRE_THROWS_WITH(x.sum({-3}), Contains("sum: dim -3 out of range"));
  REQUIRE_THROWS_WITH(x.narrow(5, 0, 1), Contains("narrow: dim 5 out of range"));
  REQUIRE_THROWS_WITH(x.slice(-3, 0, 1), Contains("slice: dim -3 out of range"));
  REQUIRE_THROWS_WITH(x.squeeze(2), Contains("squeeze: dim 2 out of range"));
  CHECK(x.size(-1) == 3);
  CHECK(x.stride(-2) == 3);
}

}  // namespace test_tensor

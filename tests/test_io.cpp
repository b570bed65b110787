// tests/test_io.cpp: the io family: the JSON reader, RawTensor conversions (bfloat16, half),
// .npy and safetensors round trips, byte-level compatibility, and malformed files, which must
// throw dg::Error naming the problem and never crash. Not a test of any Tensor bridge.
#include <catch2/catch.hpp>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "densegrad/io/json.hpp"
#include "densegrad/io/npy.hpp"
#include "densegrad/io/safetensors.hpp"

namespace test_io {

using namespace dg;
using namespace dg::io;
using Catch::Contains;
namespace fs = std::filesystem;

namespace {

// A fresh directory under the system temp dir, removed with everything in it at scope exit.
struct TempDir {
  fs::path path;
  TempDir() {
    std::random_device rd;
    do {
      path = fs::temp_directory_path() / ("densegrad_test_io_" + std::to_string(rd()) + std::to_string(rd()));
    } while (!fs::create_directory(path));
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path, ec);
  }
  std::string file(const std::string& name) const { return (path / name).string(); }
  std::vector<std::string> names() const {
    std::vector<std::string> r;
    for (const auto& e : fs::directory_iterator(path)) r.push_back(e.path().filename().string());
    return r;
  }
};

json::Value parse_json(const std::string& s) { return json::parse(s.data(), s.size(), "test.json"); }

void append_le64(std::vector<uint8_t>& out, uint64_t v) {
  for (int i = 0; i < 8; ++i) out.push_back(static_cast<uint8_t>(v >> (8 * i)));
}

// A safetensors file built by hand (not by our writer): length, header (space-padded to a
// multiple of 8 unless pad is false), then the data bytes.
std::vector<uint8_t> st_bytes(std::string header, const std::vector<uint8_t>& data, bool pad = true) {
  if (pad) header.append((8 - header.size() % 8) % 8, ' ');
  std::vector<uint8_t> out;
  append_le64(out, header.size());
  out.insert(out.end(), header.begin(), header.end());
  out.insert(out.end(), data.begin(), data.end());
  return out;
}

Safetensors parse_st(const std::vector<uint8_t>& b) { return parse_safetensors(b.data(), b.size(), "test.safetensors"); }

// A .npy file built by hand: magic, version, header length, dict padded to 64 with '\n', data.
std::vector<uint8_t> npy_bytes(const std::string& dict, size_t data_bytes, unsigned major = 1) {
  const size_t prefix = major == 1 ? 10 : 12;
  std::string header = dict;
  header.append((64 - (prefix + header.size() + 1) % 64) % 64, ' ');
  header += '\n';
  std::vector<uint8_t> out = {0x93, 'N', 'U', 'M', 'P', 'Y', static_cast<uint8_t>(major), 0};
  for (size_t i = 0; i < prefix - 8; ++i) out.push_back(static_cast<uint8_t>(header.size() >> (8 * i)));
  out.insert(out.end(), header.begin(), header.end());
  out.resize(out.size() + data_bytes, 0);
  return out;
}

RawTensor parse_np(const std::vector<uint8_t>& b) { return parse_npy(b.data(), b.size(), "test.npy"); }

uint16_t bits16(const RawTensor& t, size_t i) {
  return static_cast<uint16_t>(t.data[2 * i] | (t.data[2 * i + 1] << 8));
}

// Values exactly representable in every dtype (quarter steps in [-8, 8)), so round trips compare equal.
std::vector<double> exact_values(size_t n, bool integers) {
  std::vector<double> v(n);
  for (size_t i = 0; i < n; ++i) v[i] = integers ? double(i % 97) - 48 : double(i % 64) * 0.25 - 8;
  return v;
}

RawTensor make_tensor(DType d, const std::vector<int64_t>& shape) {
  size_t n = 1;
  for (int64_t s : shape) n *= static_cast<size_t>(s);
  return RawTensor::from_vector<double>(shape, exact_values(n, d == DType::Int64), d);
}

const std::vector<std::vector<int64_t>> kShapes = {{}, {0, 3}, {7}, {2, 3, 4}, {1, 1, 5}, {256, 257}};

// Parses every prefix of bytes (copied, so ASan sees any over-read) and requires dg::Error.
template <class Parse>
void require_every_truncation_throws(const std::vector<uint8_t>& bytes, Parse parse) {
  for (size_t k = 0; k < bytes.size(); ++k) {
    std::vector<uint8_t> prefix(bytes.begin(), bytes.begin() + static_cast<std::ptrdiff_t>(k));
    INFO("truncated to " << k << " of " << bytes.size() << " bytes");
    REQUIRE_THROWS_AS(parse(prefix), dg::Error);
  }
}

// Overwrites each byte with a few hostile values: parsing must succeed or throw dg::Error.
template <class Parse>
void require_mutations_are_safe(const std::vector<uint8_t>& bytes, Parse parse) {
  const uint8_t values[] = {0x00, 0xff, '"', '{', '[', '9', '-', ',', 0x80};
  size_t errors = 0;
  for (size_t i = 0; i < bytes.size(); ++i)
    for (uint8_t v : values) {
      std::vector<uint8_t> m = bytes;
      m[i] = v;
      try {
        parse(m);
      } catch (const dg::Error&) {
        ++errors;
      }
    }
  REQUIRE(errors > 0);
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// JSON

TEST_CASE("json: parses objects, arrays, literals and numbers", "[io][json]") {
  auto v = parse_json(R"( {"a": [1, -2, 3.5e2, true, false, null], "b": {"c": "d"}, "e": []} )");
  REQUIRE(v.kind == json::Value::Kind::Object);
  REQUIRE(v.keys == std::vector<std::string>{"a", "b", "e"});
  const auto& a = v.at("a", "t");
  REQUIRE(a.items.size() == 6);
  REQUIRE(a.items[0].as_uint64("x") == 1);
  REQUIRE(a.items[1].as_int64("x") == -2);
  REQUIRE(a.items[2].as_double("x") == 350.0);
  REQUIRE(a.items[3].boolean);
  REQUIRE(a.items[4].kind == json::Value::Kind::Bool);
  REQUIRE(a.items[5].kind == json::Value::Kind::Null);
  REQUIRE(v.at("b", "t").at("c", "t").as_string("c") == "d");
  REQUIRE(v.at("e", "t").items.empty());
  REQUIRE(v.find("zz") == nullptr);
  REQUIRE_THROWS_WITH(v.at("zz", "cfg"), Contains("missing field 'zz'"));
  REQUIRE_THROWS_WITH(v.at("b", "cfg.b").as_string("cfg.b"), Contains("expected a string, got an object"));
}

TEST_CASE("json: string escapes and UTF-8", "[io][json]") {
  auto v = parse_json(R"(["a\"b\\c\/d\b\f\n\r\t", "\u00e9\u20AC", "\ud83d\ude00", "h\u00e9llo w\u00f6rld"])");
  REQUIRE(v.items[0].text == "a\"b\\c/d\b\f\n\r\t");
  REQUIRE(v.items[1].text == "\xc3\xa9\xe2\x82\xac");  // é €
  REQUIRE(v.items[2].text == "\xf0\x9f\x98\x80");      // U+1F600 from a surrogate pair
  REQUIRE(parse_json("\"\xc3\xa9\"").text == "\xc3\xa9");  // raw UTF-8 passes through
  REQUIRE_THROWS_WITH(parse_json(R"("\ude00")"), Contains("high surrogate"));
  REQUIRE_THROWS_WITH(parse_json(R"("\ud83d")"), Contains("low surrogate"));
  REQUIRE_THROWS_WITH(parse_json(R"("\ud83d\u0041")"), Contains("low surrogate"));
  REQUIRE_THROWS_WITH(parse_json(R"("\u12")"), Contains("4 hex digits"));
  REQUIRE_THROWS_WITH(parse_json(R"("\x")"), Contains("an escape"));
  REQUIRE_THROWS_WITH(parse_json("\"a\nb\""), Contains("control characters"));
  REQUIRE_THROWS_WITH(parse_json("\"\xc3\""), Contains("valid UTF-8"));
  REQUIRE_THROWS_WITH(parse_json("\"\xc0\xaf\""), Contains("valid UTF-8"));      // overlong '/'
  REQUIRE_THROWS_WITH(parse_json("\"\xed\xa0\x80\""), Contains("valid UTF-8"));  // encoded surrogate
  REQUIRE_THROWS_WITH(parse_json("\"abc"), Contains("closing '\"'"));
}

TEST_CASE("json: integers are exact and overflow is caught", "[io][json]") {
  REQUIRE(parse_json("18446744073709551615").as_uint64("n") == std::numeric_limits<uint64_t>::max());
  REQUIRE_THROWS_WITH(parse_json("18446744073709551616").as_uint64("n"), Contains("out of range"));
  REQUIRE(parse_json("9223372036854775807").as_int64("n") == std::numeric_limits<int64_t>::max());
  REQUIRE(parse_json("-9223372036854775808").as_int64("n") == std::numeric_limits<int64_t>::min());
  REQUIRE_THROWS_WITH(parse_json("9223372036854775808").as_int64("n"), Contains("out of range"));
  REQUIRE_THROWS_WITH(parse_json("-9223372036854775809").as_int64("n"), Contains("out of range"));
  REQUIRE_THROWS_WITH(parse_json("1.5").as_uint64("n"), Contains("expected a non-negative integer, got 1.5"));
  REQUIRE_THROWS_WITH(parse_json("2.0").as_uint64("n"), Contains("got 2.0"));
  REQUIRE_THROWS_WITH(parse_json("1e3").as_int64("n"), Contains("expected an integer, got 1e3"));
  REQUIRE_THROWS_WITH(parse_json("-1").as_uint64("n"), Contains("non-negative"));
  REQUIRE_THROWS_WITH(parse_json("\"1\"").as_uint64("n"), Contains("expected a number, got a string"));
  REQUIRE(parse_json("-0.5e-1").as_double("n") == -0.05);
}

TEST_CASE("json: strict syntax with byte offsets", "[io][json]") {
  REQUIRE_THROWS_WITH(parse_json("{} x"), Contains("byte 3: expected end of input"));
  REQUIRE_THROWS_WITH(parse_json("01"), Contains("end of input after the top-level value"));
  REQUIRE_THROWS_WITH(parse_json("[1,]"), Contains("expected a JSON value, got ']'"));
  REQUIRE_THROWS_WITH(parse_json("{\"a\":1,}"), Contains("a string key"));
  REQUIRE_THROWS_WITH(parse_json("{\"a\" 1}"), Contains("':' after an object key"));
  REQUIRE_THROWS_WITH(parse_json("[1 2]"), Contains("',' or ']'"));
  REQUIRE_THROWS_WITH(parse_json("{'a':1}"), Contains("a string key"));
  REQUIRE_THROWS_WITH(parse_json("tru"), Contains("'true'"));
  REQUIRE_THROWS_WITH(parse_json("NaN"), Contains("a JSON value"));
  REQUIRE_THROWS_WITH(parse_json("-"), Contains("a digit"));
  REQUIRE_THROWS_WITH(parse_json("1."), Contains("a digit after '.'"));
  REQUIRE_THROWS_WITH(parse_json("1e"), Contains("exponent"));
  REQUIRE_THROWS_WITH(parse_json(""), Contains("got end of input"));
  REQUIRE_THROWS_WITH(parse_json(R"({"a":1, "a":2})"), Contains("byte 8: duplicate key \"a\""));
  REQUIRE_NOTHROW(parse_json(" \t\r\n{} \n "));
  std::string nul("[1]\0", 4);
  REQUIRE_THROWS_WITH(parse_json(nul), Contains("got byte 0x0"));
}

TEST_CASE("json: nesting depth is limited", "[io][json]") {
  auto nested = [](size_t d) { return std::string(d, '[') + std::string(d, ']'); };
  REQUIRE_NOTHROW(parse_json(nested(64)));
  REQUIRE_THROWS_WITH(parse_json(nested(65)), Contains("nesting depth at most 64"));
  REQUIRE_THROWS_WITH(parse_json(std::string(1000000, '[')), Contains("nesting depth"));
  std::string objs;
  for (int i = 0; i < 100; ++i) objs += "{\"a\":";
  REQUIRE_THROWS_WITH(parse_json(objs), Contains("nesting depth"));
}

TEST_CASE("json: quote escapes and round-trips", "[io][json]") {
  REQUIRE(json::quote("a\"b\\c") == "\"a\\\"b\\\\c\"");
  REQUIRE(json::quote(std::string("\n\t\x01", 3)) == "\"\\n\\t\\u0001\"");
  const char raw[] = "tab\there \"q\" \\ \x1f \xc3\xa9 \xf0\x9f\x98\x80 end\0x";
  const std::string s(raw, sizeof(raw) - 1);
  REQUIRE(parse_json(json::quote(s)).text == s);
  REQUIRE_THROWS_WITH(json::quote("bad \xff"), Contains("not valid UTF-8"));
}

// ---------------------------------------------------------------------------------------------
// RawTensor

TEST_CASE("RawTensor: numel, shape checks and conversions", "[io][raw]") {
  REQUIRE((RawTensor{DType::Float32, {}, {}}.numel()) == 1);
  REQUIRE((RawTensor{DType::Float32, {0, 3}, {}}.numel()) == 0);
  REQUIRE((RawTensor{DType::Float32, {2, 3, 4}, {}}.numel()) == 24);
  REQUIRE_THROWS_WITH((RawTensor{DType::Float32, {int64_t(1) << 62, 4}, {}}.numel()), Contains("fit in 64 bits"));
  REQUIRE_THROWS_WITH((RawTensor{DType::Float32, {2, -1}, {}}.numel()), Contains("negative dim 1 (-1)"));
  REQUIRE_THROWS_WITH(RawTensor::from_vector<float>({2, 2}, {1, 2, 3}), Contains("has 4 elements, but 3 values"));
  REQUIRE_THROWS_WITH(RawTensor::from_vector<float>({-3}, {}), Contains("negative dim"));
  REQUIRE_THROWS_WITH((RawTensor{DType::Float32, {3}, std::vector<uint8_t>(8)}.to_vector<float>()),
                      Contains("needs 12 bytes of data, has 8"));

  auto t = RawTensor::from_vector<float>({2, 3}, {1, 2, 3, 4, 5, 6});
  REQUIRE(t.dtype == DType::Float32);
  REQUIRE(t.data.size() == 24);
  REQUIRE(t.to_vector<double>() == std::vector<double>{1, 2, 3, 4, 5, 6});
  REQUIRE(t.to_vector<int64_t>() == std::vector<int64_t>{1, 2, 3, 4, 5, 6});
  auto bf = t.to_vector<bfloat16>();
  REQUIRE(float(bf[5]) == 6.0f);

  auto i = RawTensor::from_vector<int64_t>({3}, {-7, 0, int64_t(1) << 40});
  REQUIRE(i.to_vector<int64_t>() == std::vector<int64_t>{-7, 0, int64_t(1) << 40});
  REQUIRE(i.to_vector<double>() == std::vector<double>{-7, 0, 1099511627776.0});
  REQUIRE(i.to_vector<float>()[0] == -7.0f);
  REQUIRE(RawTensor::from_vector<int64_t>({2}, {3, -4}, DType::Float16).to_vector<float>() == std::vector<float>{3, -4});

  REQUIRE(RawTensor::from_vector<double>({2}, {2.0, -3.0}, DType::Int64).to_vector<int64_t>() == std::vector<int64_t>{2, -3});
  REQUIRE_THROWS_WITH(RawTensor::from_vector<double>({2}, {2.0, 2.5}, DType::Int64),
                      Contains("element 1 of a F64 tensor is 2.5, which is not an integer"));
  REQUIRE_THROWS_WITH(RawTensor::from_vector<float>({1}, {1.5f}).to_vector<int64_t>(), Contains("not an integer"));
  REQUIRE_THROWS_WITH(RawTensor::from_vector<float>({1}, {NAN}).to_vector<int64_t>(), Contains("not an integer"));
  REQUIRE_THROWS_WITH(RawTensor::from_vector<float>({1}, {1e30f}).to_vector<int64_t>(), Contains("not an integer"));
  REQUIRE(RawTensor::from_vector<double>({1}, {-9223372036854775808.0}).to_vector<int64_t>()[0] ==
          std::numeric_limits<int64_t>::min());
  REQUIRE(RawTensor::from_vector<double>({1}, {0.1}, DType::Float32).to_vector<double>()[0] == double(0.1f));
  REQUIRE(RawTensor::from_vector<bfloat16>({1}, {bfloat16(1.5f)}, DType::Float64).to_vector<double>()[0] == 1.5);

  // bytes are little-endian, C order
  auto le = RawTensor::from_vector<int64_t>({1}, {0x0102030405060708});
  REQUIRE(le.data == std::vector<uint8_t>{8, 7, 6, 5, 4, 3, 2, 1});
}

TEST_CASE("RawTensor: float16 conversions round to nearest even", "[io][raw]") {
  const float inf = std::numeric_limits<float>::infinity();
  const std::vector<float> in = {1.0f, -2.5f, 65504.0f, 65519.0f, 65520.0f, std::ldexp(1.0f, -24),
                                 std::ldexp(1.0f, -25), std::ldexp(1.5f, -24), std::ldexp(1023.0f, -24),
                                 inf, -inf, 1.0f + std::ldexp(1.0f, -11), 1.0f + std::ldexp(3.0f, -11),
                                 -0.0f, 1e-10f};
  const std::vector<uint16_t> want = {0x3C00, 0xC100, 0x7BFF, 0x7BFF, 0x7C00, 0x0001, 0x0000, 0x0002,
                                      0x03FF, 0x7C00, 0xFC00, 0x3C00, 0x3C02, 0x8000, 0x0000};
  auto t = RawTensor::from_vector<float>({int64_t(in.size())}, in, DType::Float16);
  for (size_t i = 0; i < in.size(); ++i) {
    INFO("value " << in[i]);
    REQUIRE(bits16(t, i) == want[i]);
  }
  auto nan = RawTensor::from_vector<float>({1}, {std::nanf("")}, DType::Float16);
  REQUIRE((bits16(nan, 0) & 0x7C00) == 0x7C00);
  REQUIRE((bits16(nan, 0) & 0x03FF) != 0);

  auto back = t.to_vector<float>();
  REQUIRE(back[0] == 1.0f);
  REQUIRE(back[1] == -2.5f);
  REQUIRE(back[2] == 65504.0f);
  REQUIRE(back[4] == inf);
  REQUIRE(back[5] == std::ldexp(1.0f, -24));   // smallest subnormal
  REQUIRE(back[8] == std::ldexp(1023.0f, -24));  // largest subnormal
  REQUIRE(back[10] == -inf);
  REQUIRE(std::signbit(back[13]));
  REQUIRE(std::isnan(nan.to_vector<float>()[0]));
  REQUIRE(std::isnan(nan.to_vector<double>()[0]));
}

TEST_CASE("RawTensor: bfloat16 conversions round to nearest even", "[io][raw]") {
  const float inf = std::numeric_limits<float>::infinity();
  const std::vector<float> in = {1.0f, -2.5f, 65504.0f, 1.0f + std::ldexp(1.0f, -8),
                                 1.0f + std::ldexp(3.0f, -8), inf, -inf, 1e-40f, 3.0e38f, std::nanf("")};
  const std::vector<uint16_t> want = {0x3F80, 0xC020, 0x4780, 0x3F80, 0x3F82, 0x7F80, 0xFF80, 0x0001, 0x7F62, 0x7FC0};
  auto t = RawTensor::from_vector<float>({int64_t(in.size())}, in, DType::BFloat16);
  for (size_t i = 0; i < in.size(); ++i) {
    INFO("value " << in[i]);
    REQUIRE(bits16(t, i) == want[i]);
  }
  auto back = t.to_vector<float>();
  REQUIRE(back[1] == -2.5f);
  REQUIRE(back[2] == 65536.0f);
  REQUIRE(back[7] == std::ldexp(1.0f, -133));  // bf16 subnormal 0x0001
  REQUIRE(back[5] == inf);
  REQUIRE(std::isnan(back[9]));
  // doubles go through float, like torch: 1 + 2^-8 + 2^-30 becomes the float tie 1 + 2^-8, then even
  auto d = RawTensor::from_vector<double>({1}, {1.0 + std::ldexp(1.0, -8) + std::ldexp(1.0, -30)}, DType::BFloat16);
  REQUIRE(bits16(d, 0) == 0x3F80);
  // BF16 -> bfloat16 keeps the bits
  REQUIRE(t.to_vector<bfloat16>()[4].bits == 0x3F82);
}

// ---------------------------------------------------------------------------------------------
// .npy

TEST_CASE("npy: round trip F32, F64, I64 for all shapes", "[io][npy]") {
  TempDir dir;
  for (DType d : {DType::Float32, DType::Float64, DType::Int64})
    for (const auto& shape : kShapes) {
      RawTensor t = make_tensor(d, shape);
      const std::string path = dir.file("t.npy");
      INFO(dtype_name(d) << " shape " << dg::io::detail::shape_str(shape));
      write_npy(path, t);
      RawTensor r = read_npy(path);
      REQUIRE(r.dtype == d);
      REQUIRE(r.shape == shape);
      REQUIRE(r.data == t.data);
      // version 1.0, data 64-byte aligned, header ends with '\n'
      std::vector<uint8_t> b = serialize_npy(t);
      const size_t header_len = b[8] | (b[9] << 8);
      REQUIRE(b[6] == 1);
      REQUIRE((10 + header_len) % 64 == 0);
      REQUIRE(b[10 + header_len - 1] == '\n');
      REQUIRE(b.size() == 10 + header_len + t.data.size());
    }
  REQUIRE(dir.names() == std::vector<std::string>{"t.npy"});
  REQUIRE_THROWS_WITH(write_npy(dir.file("b.npy"), make_tensor(DType::BFloat16, {2})),
                      Contains("dtype BF16 has no .npy equivalent"));
  REQUIRE_THROWS_WITH(write_npy(dir.file("h.npy"), make_tensor(DType::Float16, {2})), Contains("F16"));
  REQUIRE(dir.names() == std::vector<std::string>{"t.npy"});
}

TEST_CASE("npy: reads bytes exactly as numpy.save writes them", "[io][npy]") {
  // np.save(f, np.array([[1.5, -2], [3, 4e10]], dtype='<f8'))
  std::string header = "{'descr': '<f8', 'fortran_order': False, 'shape': (2, 2), }";
  header.append(117 - header.size(), ' ');
  header += '\n';
  std::vector<uint8_t> b = {0x93, 'N', 'U', 'M', 'P', 'Y', 1, 0, 0x76, 0x00};
  b.insert(b.end(), header.begin(), header.end());
  const uint8_t data[] = {0, 0, 0, 0, 0, 0, 0xf8, 0x3f, 0, 0, 0, 0, 0, 0, 0, 0xc0,
                          0, 0, 0, 0, 0, 0, 0x08, 0x40, 0, 0, 0, 0x20, 0x5f, 0xa0, 0x22, 0x42};
  b.insert(b.end(), std::begin(data), std::end(data));
  RawTensor t = parse_np(b);
  REQUIRE(t.shape == std::vector<int64_t>{2, 2});
  REQUIRE(t.to_vector<double>() == std::vector<double>{1.5, -2, 3, 4e10});
  REQUIRE(serialize_npy(t) == b);  // and we write the same bytes

  // versions 2.0 and 3.0 (4-byte header length), the '|'-less descr, old-style '3L', scalar ()
  REQUIRE(parse_np(npy_bytes("{'descr': '<i8', 'fortran_order': False, 'shape': (), }", 8, 2)).shape.empty());
  REQUIRE(parse_np(npy_bytes("{'descr': 'f4', 'fortran_order': False, 'shape': (3L,), }", 12, 3)).dtype == DType::Float32);
  REQUIRE(parse_np(npy_bytes("{\"shape\": (2, 0), \"descr\": \"<f4\", \"fortran_order\": False}", 0)).shape ==
          std::vector<int64_t>{2, 0});
}

TEST_CASE("npy: malformed files throw dg::Error naming the problem", "[io][npy]") {
  const std::string ok_dict = "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }";
  const auto ok = npy_bytes(ok_dict, 24);
  REQUIRE_NOTHROW(parse_np(ok));
  require_every_truncation_throws(ok, parse_np);
  require_mutations_are_safe(std::vector<uint8_t>(ok.begin(), ok.end() - 20), parse_np);

  auto bad_magic = ok;
  bad_magic[1] = 'X';
  REQUIRE_THROWS_WITH(parse_np(bad_magic), Contains("bad magic"));
  auto bad_version = ok;
  bad_version[6] = 4;
  REQUIRE_THROWS_WITH(parse_np(bad_version), Contains("unsupported npy format version 4.0"));
  auto long_header = ok;
  long_header[8] = 0xff;
  long_header[9] = 0xff;
  REQUIRE_THROWS_WITH(parse_np(long_header), Contains("header length 65535 runs past the end of the file"));
  REQUIRE_THROWS_WITH(parse_np(std::vector<uint8_t>(ok.begin(), ok.begin() + 9)), Contains("shorter than the 10-byte"));

  auto dict = [](const std::string& descr, const std::string& fortran, const std::string& shape) {
    return "{'descr': '" + descr + "', 'fortran_order': " + fortran + ", 'shape': " + shape + ", }";
  };
  REQUIRE_THROWS_WITH(parse_np(npy_bytes(dict("<f4", "True", "(2, 3)"), 24)), Contains("fortran order not supported"));
  REQUIRE_THROWS_WITH(parse_np(npy_bytes(dict(">f4", "False", "(2, 3)"), 24)), Contains("big-endian descr '>f4'"));
  for (const char* d : {"<f2", "<i4", "|O", "|u1", "<c8"})
    REQUIRE_THROWS_WITH(parse_np(npy_bytes(dict(d, "False", "(2, 3)"), 24)),
                        Contains(std::string("unsupported descr '") + d + "'") && Contains("'<f4', '<f8', '<i8'"));
  REQUIRE_THROWS_WITH(parse_np(npy_bytes(dict("<f4", "False", "(2, 3)"), 20)), Contains("data is 20 bytes, expected 24"));
  REQUIRE_THROWS_WITH(parse_np(npy_bytes(dict("<f4", "False", "(2, 3)"), 28)), Contains("data is 28 bytes, expected 24"));
  REQUIRE_THROWS_WITH(parse_np(npy_bytes(dict("<f4", "False", "(4611686018427387904, 4)"), 0)), Contains("fit in 64 bits"));
  REQUIRE_THROWS_WITH(parse_np(npy_bytes(dict("<f8", "False", "(1152921504606846976, 2)"), 0)), Contains("more bytes than fit"));
  REQUIRE_THROWS_WITH(parse_np(npy_bytes(dict("<f4", "False", "(99999999999999999999,)"), 0)), Contains("does not fit"));
  REQUIRE_THROWS_WITH(parse_np(npy_bytes(dict("<f4", "False", "(-1, 3)"), 0)), Contains("negative dimension"));
  REQUIRE_THROWS_WITH(parse_np(npy_bytes(dict("<f4", "False", "(3)"), 12)), Contains("is not a tuple"));
  REQUIRE_THROWS_WITH(parse_np(npy_bytes("{'descr': '<f4', 'shape': (3,), }", 12)), Contains("misses key 'fortran_order'"));
  REQUIRE_THROWS_WITH(parse_np(npy_bytes(ok_dict + "x", 24)), Contains("end of header"));
  REQUIRE_THROWS_WITH(parse_np(npy_bytes("{'descr': '<f4', 'descr': '<f4', 'fortran_order': False, 'shape': (3,), }", 12)),
                      Contains("duplicate key 'descr'"));
  REQUIRE_THROWS_WITH(parse_np(npy_bytes("{'descr': [('a', '<f4')], 'fortran_order': False, 'shape': (3,), }", 12)),
                      Contains("structured dtypes are not supported"));
  REQUIRE_THROWS_WITH(parse_np(npy_bytes(dict("<f4", "false", "(3,)"), 12)), Contains("True or False"));
  REQUIRE_THROWS_WITH(parse_np(npy_bytes("{'descr': '<f4', 'fortran_order': False, 'shape': (3,), 'x': 1}", 12)),
                      Contains("unexpected key 'x'"));
}

TEST_CASE("npy: missing files throw naming the path", "[io][npy]") {
  TempDir dir;
  const std::string missing = dir.file("missing.npy");
  REQUIRE_THROWS_WITH(read_npy(missing), Contains(missing) && Contains("cannot read"));
  REQUIRE_THROWS_WITH(read_npy(dir.path.string()), Contains("no such regular file"));
  const std::string bad = dir.file("no_such_dir/x.npy");
  REQUIRE_THROWS_WITH(write_npy(bad, make_tensor(DType::Float32, {2})), Contains(bad) && Contains("cannot write"));
}

// ---------------------------------------------------------------------------------------------
// safetensors

TEST_CASE("safetensors: round trip every dtype and shape, with metadata", "[io][safetensors]") {
  TempDir dir;
  std::map<std::string, RawTensor> tensors;
  for (DType d : {DType::Float32, DType::Float64, DType::BFloat16, DType::Float16, DType::Int64})
    for (size_t s = 0; s < kShapes.size(); ++s)
      tensors[std::string(dtype_name(d)) + ".shape" + std::to_string(s)] = make_tensor(d, kShapes[s]);
  tensors["unicode \xc3\xa9 \"quoted\""] = make_tensor(DType::Float32, {2});
  const std::map<std::string, std::string> metadata = {{"format", "pt"}, {"note", "a \"b\"\n\xe2\x82\xac"}};
  const std::string path = dir.file("model.safetensors");
  write_safetensors(path, tensors, metadata);

  Safetensors r = read_safetensors(path);
  REQUIRE(r.metadata == metadata);
  REQUIRE(r.tensors.size() == tensors.size());
  for (const auto& [name, t] : tensors) {
    INFO(name);
    REQUIRE(r.tensors.count(name) == 1);
    const RawTensor& got = r.tensors.at(name);
    REQUIRE(got.dtype == t.dtype);
    REQUIRE(got.shape == t.shape);
    REQUIRE(got.data == t.data);
    REQUIRE(got.to_vector<double>() == exact_values(size_t(t.numel()), t.dtype == DType::Int64));
  }
  // the header is padded to a multiple of 8 and the file is exactly what serialize produces
  std::ifstream f(path, std::ios::binary);
  std::vector<uint8_t> bytes((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  REQUIRE(bytes == serialize_safetensors(tensors, metadata));
  REQUIRE(dg::io::detail::load_le(bytes.data(), 8) % 8 == 0);

  // empty file, no metadata; and the Safetensors overload
  write_safetensors(path, Safetensors{});
  REQUIRE(read_safetensors(path).tensors.empty());
  REQUIRE(dir.names() == std::vector<std::string>{"model.safetensors"});
}

TEST_CASE("safetensors: parses a file built byte by byte", "[io][safetensors]") {
  // {"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}} is 54 bytes; padded to 56
  const std::string header = R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})";
  std::vector<uint8_t> b = {56, 0, 0, 0, 0, 0, 0, 0};
  b.insert(b.end(), header.begin(), header.end());
  b.insert(b.end(), {' ', ' '});
  b.insert(b.end(), {0x00, 0x00, 0x80, 0x3f, 0x00, 0x00, 0x20, 0xc0});  // 1.0f, -2.5f
  Safetensors st = parse_st(b);
  REQUIRE(st.tensors.size() == 1);
  REQUIRE(st.metadata.empty());
  REQUIRE(st.tensors.at("a").shape == std::vector<int64_t>{2});
  REQUIRE(st.tensors.at("a").to_vector<float>() == std::vector<float>{1.0f, -2.5f});
  REQUIRE(serialize_safetensors(st.tensors) == b);  // our writer produces the same bytes

  // written by Python: safetensors.torch.save_file({"w": f16 [[1,-2.5],[65504,.5]],
  //   "b": bf16 [1,-2.5,3], "i": int64 42}, metadata={"format": "pt"}); offsets not in name order
  const std::string py_header =
      R"({"__metadata__":{"format":"pt"},"i":{"dtype":"I64","shape":[],"data_offsets":[0,8]},)"
      R"("b":{"dtype":"BF16","shape":[3],"data_offsets":[8,14]},"w":{"dtype":"F16","shape":[2,2],"data_offsets":[14,22]}}    )";
  std::vector<uint8_t> py = {200, 0, 0, 0, 0, 0, 0, 0};
  py.insert(py.end(), py_header.begin(), py_header.end());
  py.insert(py.end(), {0x2a, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x80, 0x3f, 0x20, 0xc0, 0x40, 0x40,
                       0x00, 0x3c, 0x00, 0xc1, 0xff, 0x7b, 0x00, 0x38});
  Safetensors p = parse_st(py);
  REQUIRE(p.metadata == std::map<std::string, std::string>{{"format", "pt"}});
  REQUIRE(p.tensors.at("i").shape.empty());
  REQUIRE(p.tensors.at("i").to_vector<int64_t>() == std::vector<int64_t>{42});
  REQUIRE(p.tensors.at("b").to_vector<float>() == std::vector<float>{1.0f, -2.5f, 3.0f});
  REQUIRE(p.tensors.at("w").shape == std::vector<int64_t>{2, 2});
  REQUIRE(p.tensors.at("w").to_vector<float>() == std::vector<float>{1.0f, -2.5f, 65504.0f, 0.5f});
  // a null __metadata__ and an unpadded header are accepted, like the reference reader
  REQUIRE(parse_st(st_bytes(R"({"__metadata__":null})", {}, false)).tensors.empty());
}

TEST_CASE("safetensors: malformed files throw dg::Error naming the problem", "[io][safetensors]") {
  auto entry = [](const std::string& name, const std::string& dtype, const std::string& shape,
                  uint64_t b, uint64_t e) {
    return "\"" + name + "\":{\"dtype\":\"" + dtype + "\",\"shape\":" + shape + ",\"data_offsets\":[" +
           std::to_string(b) + "," + std::to_string(e) + "]}";
  };
  auto zeros = [](size_t n) { return std::vector<uint8_t>(n, 0); };
  const auto ok = st_bytes("{" + entry("a", "F32", "[2]", 0, 8) + "," + entry("b", "F16", "[3]", 8, 14) + "}", zeros(14));
  SECTION("every truncation and byte mutation of a valid file") {
    REQUIRE_NOTHROW(parse_st(ok));
    require_every_truncation_throws(ok, parse_st);
    require_mutations_are_safe(ok, parse_st);
  }

  SECTION("header length") {
    REQUIRE_THROWS_WITH(parse_st({1, 2, 3}), Contains("HeaderTooSmall"));
    std::vector<uint8_t> huge;
    append_le64(huge, uint64_t(1) << 63);
    REQUIRE_THROWS_WITH(parse_st(huge), Contains("HeaderTooLarge"));
    std::vector<uint8_t> just_over;
    append_le64(just_over, 100000001);
    REQUIRE_THROWS_WITH(parse_st(just_over), Contains("HeaderTooLarge"));
    std::vector<uint8_t> past = ok;
    past[0] = 0xff;
    REQUIRE_THROWS_WITH(parse_st(past), Contains("InvalidHeaderLength: header length 255 runs past the end"));
  }
  SECTION("header JSON") {
    REQUIRE_THROWS_WITH(parse_st(st_bytes("not json", {})), Contains("InvalidHeaderStart"));
    REQUIRE_THROWS_WITH(parse_st(st_bytes("{\"a\":", {})), Contains("InvalidHeaderDeserialization"));
    REQUIRE_THROWS_WITH(parse_st(st_bytes("[]", {})), Contains("must start with '{'"));
    REQUIRE_THROWS_WITH(parse_st(st_bytes("{} x", {})), Contains("not valid JSON"));
    REQUIRE_THROWS_WITH(parse_st(st_bytes("{\"\xff\":1}", {})), Contains("valid UTF-8"));
    REQUIRE_THROWS_WITH(parse_st(st_bytes("{" + entry("a", "F32", "[2]", 0, 8) + "," + entry("a", "F32", "[2]", 8, 16) + "}", zeros(16))),
                        Contains("duplicate key \"a\""));
  }
  SECTION("offsets") {
    REQUIRE_THROWS_WITH(parse_st(st_bytes("{" + entry("a", "F32", "[2]", 0, 8) + "," + entry("b", "F32", "[2]", 4, 12) + "}", zeros(12))),
                        Contains("tensor 'b': InvalidOffset") && Contains("overlap"));
    REQUIRE_THROWS_WITH(parse_st(st_bytes("{" + entry("a", "F32", "[2]", 0, 8) + "," + entry("b", "F32", "[2]", 12, 20) + "}", zeros(20))),
                        Contains("tensor 'b': InvalidOffset") && Contains("gap after the previous tensor, which ends at 8"));
    REQUIRE_THROWS_WITH(parse_st(st_bytes("{" + entry("a", "F32", "[2]", 4, 12) + "}", zeros(12))),
                        Contains("InvalidOffset") && Contains("must start at 0"));
    REQUIRE_THROWS_WITH(parse_st(st_bytes("{" + entry("a", "F32", "[0]", 8, 0) + "}", zeros(8))),
                        Contains("InvalidOffset") && Contains("end before begin"));
    REQUIRE_THROWS_WITH(parse_st(st_bytes("{" + entry("a", "F32", "[3]", 0, 8) + "}", zeros(8))),
                        Contains("TensorInvalidInfo") && Contains("span 8 bytes, but shape [3] of F32 needs 12"));
  }
  SECTION("data buffer shorter or longer than declared") {
    const std::string h = "{" + entry("a", "F32", "[2]", 0, 8) + "}";
    REQUIRE_THROWS_WITH(parse_st(st_bytes(h, zeros(7))), Contains("MetadataIncompleteBuffer: tensors cover 8 bytes of data, but the file has 7"));
    REQUIRE_THROWS_WITH(parse_st(st_bytes(h, zeros(9))), Contains("MetadataIncompleteBuffer"));
    REQUIRE_THROWS_WITH(parse_st(st_bytes("{}", zeros(1))), Contains("MetadataIncompleteBuffer"));
  }
  SECTION("shapes") {
    REQUIRE_THROWS_WITH(parse_st(st_bytes("{" + entry("a", "F32", "[4611686018427387904,4]", 0, 0) + "}", {})),
                        Contains("tensor 'a'") && Contains("more elements than fit in 64 bits"));
    REQUIRE_THROWS_WITH(parse_st(st_bytes("{" + entry("a", "F64", "[1152921504606846976,2]", 0, 0) + "}", {})),
                        Contains("more bytes than fit in 64 bits"));
    REQUIRE_THROWS_WITH(parse_st(st_bytes("{" + entry("a", "F32", "[18446744073709551615]", 0, 0) + "}", {})),
                        Contains("shape[0]: dimension 18446744073709551615 does not fit"));
    REQUIRE_THROWS_WITH(parse_st(st_bytes("{" + entry("a", "F32", "[-1]", 0, 0) + "}", {})),
                        Contains("shape[0]: expected a non-negative integer, got -1"));
    REQUIRE_THROWS_WITH(parse_st(st_bytes("{" + entry("a", "F32", "[2.0]", 0, 8) + "}", zeros(8))), Contains("got 2.0"));
    REQUIRE_THROWS_WITH(parse_st(st_bytes("{" + entry("a", "F32", "2", 0, 8) + "}", zeros(8))), Contains("shape: expected an array"));
  }
  SECTION("entries") {
    for (const char* d : {"I32", "U8", "BOOL", "F8_E4M3", "I8", "U64"})
      REQUIRE_THROWS_WITH(parse_st(st_bytes("{" + entry("a", d, "[1]", 0, 1) + "}", zeros(1))),
                          Contains(std::string("unsupported dtype '") + d + "'") && Contains("F32, F64, BF16, F16, I64"));
    REQUIRE_THROWS_WITH(parse_st(st_bytes("{" + entry("a", "float32", "[1]", 0, 4) + "}", zeros(4))), Contains("unknown dtype 'float32'"));
    REQUIRE_THROWS_WITH(parse_st(st_bytes(R"({"a":{"dtype":"F32","shape":[1]}})", zeros(4))),
                        Contains("tensor 'a': missing field 'data_offsets'"));
    REQUIRE_THROWS_WITH(parse_st(st_bytes(R"({"a":{"shape":[1],"data_offsets":[0,4]}})", zeros(4))), Contains("missing field 'dtype'"));
    REQUIRE_THROWS_WITH(parse_st(st_bytes(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4],"x":1}})", zeros(4))),
                        Contains("unknown field 'x'"));
    REQUIRE_THROWS_WITH(parse_st(st_bytes(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4,8]}})", zeros(4))),
                        Contains("data_offsets must be [begin, end], got 3 numbers"));
    REQUIRE_THROWS_WITH(parse_st(st_bytes(R"({"a":[1]})", {})), Contains("tensor 'a': expected an object, got an array"));
    REQUIRE_THROWS_WITH(parse_st(st_bytes(R"({"a":{"dtype":7,"shape":[1],"data_offsets":[0,4]}})", zeros(4))),
                        Contains("dtype: expected a string, got a number"));
  }
  SECTION("metadata") {
    REQUIRE_THROWS_WITH(parse_st(st_bytes(R"({"__metadata__":{"k":1}})", {})), Contains("__metadata__['k']: expected a string"));
    REQUIRE_THROWS_WITH(parse_st(st_bytes(R"({"__metadata__":"x"})", {})), Contains("__metadata__: expected an object"));
  }
}

// A shape like [0, 2^62, 2^62] has 0 elements, but a tensor of that shape has a stride of 2^124:
// such a file, read into a Tensor, overflows int64 (a UBSan report in tests/fuzz/fuzz_checkpoint).
TEST_CASE("safetensors, npy: a 0-element shape whose other dims overflow 64 bits is refused", "[io][safetensors][npy]") {
  const int64_t big = int64_t(1) << 62;
  auto entry = [](const std::string& shape) {
    return "{\"a\":{\"dtype\":\"F32\",\"shape\":" + shape + ",\"data_offsets\":[0,0]}}";
  };
  auto dict = [](const std::string& descr, const std::string& shape) {
    return "{'descr': '" + descr + "', 'fortran_order': False, 'shape': " + shape + ", }";
  };
  REQUIRE_THROWS_WITH((RawTensor{DType::Float32, {0, big, big}, {}}.numel()),
                      Contains("more elements than fit in 64 bits (counting its non-zero dims"));
  REQUIRE((RawTensor{DType::Float32, {0, int64_t(1) << 31, int64_t(1) << 31}, {}}.numel()) == 0);
  REQUIRE_THROWS_WITH(parse_st(st_bytes(entry("[0,4611686018427387904,4611686018427387904]"), {})),
                      Contains("tensor 'a'") && Contains("fit in 64 bits"));
  REQUIRE_THROWS_WITH(parse_np(npy_bytes(dict("<f4", "(0, 4611686018427387904, 4611686018427387904)"), 0)),
                      Contains("fit in 64 bits"));
  REQUIRE(parse_st(st_bytes(entry("[0,4]"), {})).tensors.at("a").shape == std::vector<int64_t>{0, 4});
  REQUIRE(parse_np(npy_bytes(dict("<f8", "(3, 0)"), 0)).shape == std::vector<int64_t>{3, 0});
}

TEST_CASE("safetensors: atomic writes and file errors name the path", "[io][safetensors]") {
  TempDir dir;
  const std::string path = dir.file("w.safetensors");
  std::map<std::string, RawTensor> one = {{"x", make_tensor(DType::Float32, {3})}};
  write_safetensors(path, one);
  REQUIRE(dir.names() == std::vector<std::string>{"w.safetensors"});  // no .tmp left behind
  std::map<std::string, RawTensor> two = {{"y", make_tensor(DType::BFloat16, {2, 2})}};
  write_safetensors(path, two);  // replaces the old file
  REQUIRE(read_safetensors(path).tensors.count("y") == 1);
  REQUIRE(dir.names() == std::vector<std::string>{"w.safetensors"});

  const std::string bad = dir.file("no_such_dir/w.safetensors");
  REQUIRE_THROWS_WITH(write_safetensors(bad, one), Contains("cannot write '" + bad + "'"));
  const std::string missing = dir.file("missing.safetensors");
  REQUIRE_THROWS_WITH(read_safetensors(missing), Contains("cannot read '" + missing + "'"));

  // invalid tensors are rejected before anything is written
  RawTensor broken{DType::Float32, {3}, std::vector<uint8_t>(5)};
  REQUIRE_THROWS_WITH(write_safetensors(dir.file("b.safetensors"), {{"z", broken}}),
                      Contains("tensor 'z'") && Contains("needs 12 bytes of data, has 5"));
  REQUIRE_THROWS_WITH(write_safetensors(dir.file("b.safetensors"), {{"__metadata__", one.at("x")}}),
                      Contains("reserved"));
  REQUIRE(dir.names() == std::vector<std::string>{"w.safetensors"});

  // a file on disk that is truncated is reported with its path
  auto bytes = serialize_safetensors(one);
  std::ofstream(dir.file("cut.safetensors"), std::ios::binary)
      .write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size() - 1));
  REQUIRE_THROWS_WITH(read_safetensors(dir.file("cut.safetensors")),
                      Contains(dir.file("cut.safetensors")) && Contains("MetadataIncompleteBuffer"));
}

}  // namespace test_io

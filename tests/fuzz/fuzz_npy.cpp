// tests/fuzz/fuzz_npy.cpp: libFuzzer target for io::parse_npy. Every input is either rejected with
// dg::Error or accepted; an accepted array must convert element by element and survive
// serialize -> parse unchanged. Crashes, sanitizer reports and other exceptions are findings.
#include <densegrad/io/npy.hpp>

#include "fuzz_util.hpp"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  fuzz::accept_or_reject([&] {
    const dg::io::RawTensor t = dg::io::parse_npy(data, size, "fuzz input");
    t.check("accepted array");
    fuzz::check(static_cast<int64_t>(t.to_vector<float>().size()) == t.numel(), "to_vector<float> size");
    fuzz::accept_or_reject([&] { t.to_vector<int64_t>(); });  // a non-integer float is an error
    const std::vector<uint8_t> bytes = dg::io::serialize_npy(t);
    const dg::io::RawTensor back = dg::io::parse_npy(bytes.data(), bytes.size(), "round trip");
    fuzz::check(back.dtype == t.dtype && back.shape == t.shape && back.data == t.data, "npy round trip");
  });
  return 0;
}

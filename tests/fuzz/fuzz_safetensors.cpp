// tests/fuzz/fuzz_safetensors.cpp: libFuzzer target for io::parse_safetensors. Every input is
// either rejected with dg::Error or accepted; an accepted file must convert element by element
// and survive serialize -> parse unchanged. Crashes, sanitizer reports and other exceptions are findings.
#include <densegrad/io/safetensors.hpp>

#include "fuzz_util.hpp"

namespace {

bool same(const dg::io::RawTensor& a, const dg::io::RawTensor& b) {
  return a.dtype == b.dtype && a.shape == b.shape && a.data == b.data;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  fuzz::accept_or_reject([&] {
    const dg::io::Safetensors st = dg::io::parse_safetensors(data, size, "fuzz input");
    for (const auto& kv : st.tensors) {
      const dg::io::RawTensor& t = kv.second;
      t.check("accepted tensor");  // the bytes match shape and dtype
      fuzz::check(static_cast<int64_t>(t.to_vector<double>().size()) == t.numel(), "to_vector<double> size");
      fuzz::check(t.to_vector<float>().size() == t.to_vector<dg::bfloat16>().size(), "to_vector<float/bf16> size");
      fuzz::accept_or_reject([&] { t.to_vector<int64_t>(); });  // a non-integer float is an error
    }
    const std::vector<uint8_t> bytes = dg::io::serialize_safetensors(st.tensors, st.metadata);
    const dg::io::Safetensors back = dg::io::parse_safetensors(bytes.data(), bytes.size(), "round trip");
    fuzz::check(back.metadata == st.metadata, "metadata round trip");
    fuzz::check(back.tensors.size() == st.tensors.size(), "tensor count round trip");
    for (const auto& [name, t] : st.tensors)
      fuzz::check(back.tensors.count(name) && same(back.tensors.at(name), t), "tensor round trip");
  });
  return 0;
}

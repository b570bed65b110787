// tests/fuzz/fuzz_cifar10.cpp: libFuzzer target for data::read_cifar10_batch, plain and gzip.
// The first input byte picks the file: bit 0 clear, the rest of the input as is; set, the rest
// gzip-compressed here. read_cifar10_batch only takes a path, so the file lives in a memfd.
#include <densegrad/data/cifar10.hpp>

#include "fuzz_util.hpp"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0) return 0;
  static fuzz::MemFile file("cifar10");
  const std::vector<uint8_t> body = (data[0] & 1) ? fuzz::gzip(data + 1, size - 1) : std::vector<uint8_t>(data + 1, data + size);
  const std::string& path = file.write(body.data(), body.size());
  fuzz::accept_or_reject([&] {
    const dg::data::Dataset d = dg::data::read_cifar10_batch(path);
    fuzz::check(d.size() > 0 && d.shape() == dg::Shape{d.size(), 3, 32, 32}, "shape (N, 3, 32, 32)");
    fuzz::check(static_cast<int64_t>(d.labels().size()) == d.size(), "one label per image");
    for (int64_t label : d.labels()) fuzz::check(label >= 0 && label < 10, "labels in [0, 10)");
  });
  return 0;
}

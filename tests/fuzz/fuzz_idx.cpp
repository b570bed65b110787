// tests/fuzz/fuzz_idx.cpp: libFuzzer target for data::read_idx (MNIST's IDX format), plain and gzip,
// and for load_idx, which turns an image file and a label file into a Dataset.
// The first input byte picks the file: bit 0 clear, the rest of the input as is (which may itself
// be a damaged gzip file); set, the rest gzip-compressed here, so the reader decompresses data the
// fuzzer chose. read_idx only takes a path, so the files live in memfds.
#include <densegrad/data/idx.hpp>

#include "fuzz_util.hpp"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0) return 0;
  static fuzz::MemFile file("idx"), labels_file("idx-labels");
  const std::vector<uint8_t> body = (data[0] & 1) ? fuzz::gzip(data + 1, size - 1) : std::vector<uint8_t>(data + 1, data + size);
  const std::string& path = file.write(body.data(), body.size());
  int64_t images = -1;  // the image count, when the file reads as 3-D images
  for (int ndim = 1; ndim <= 4; ++ndim)
    fuzz::accept_or_reject([&] {
      const dg::data::IdxData d = dg::data::read_idx(path, ndim);
      uint64_t numel = 1;
      for (int64_t n : d.dims) numel *= static_cast<uint64_t>(n);
      fuzz::check(static_cast<int>(d.dims.size()) == ndim && numel == d.bytes.size(), "dims match the data");
      if (ndim == 3) images = d.dims[0];
    });
  if (images < 0) return 0;
  // A label file of that many labels (cycling through 0..9), and the two loaded as a Dataset.
  std::vector<uint8_t> labels = {0, 0, 8, 1};
  for (int s = 24; s >= 0; s -= 8) labels.push_back(static_cast<uint8_t>(images >> s));
  for (int64_t i = 0; i < images; ++i) labels.push_back(static_cast<uint8_t>(i % 10));
  const std::string& labels_path = labels_file.write(labels.data(), labels.size());
  fuzz::accept_or_reject([&] {
    const dg::data::Dataset d = dg::data::load_idx(path, labels_path, 10);
    fuzz::check(d.size() == images && d.channels() == 1, "a Dataset of (N, 1, H, W) images");
  });
  return 0;
}

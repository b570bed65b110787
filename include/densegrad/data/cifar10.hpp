// densegrad/data/cifar10.hpp: CIFAR-10 "binary version" batches: records of 1 label byte and
// 3072 pixel bytes (1024 red, 1024 green, 1024 blue: already (C, H, W) = (3, 32, 32) order).
// Not the Python-pickle version, and not CIFAR-100 (whose records carry two label bytes).
#pragma once

#include <array>
#include <string>
#include <vector>

#include "idx.hpp"  // detail::FileReader: plain or .gz files with checked sizes

namespace dg::data {

/// One CIFAR-10 binary batch file (data_batch_1.bin ... test_batch.bin, or the same .gz) as a
/// Dataset of (N, 3, 32, 32) uint8 images. The file must hold a positive whole number of records.
inline Dataset read_cifar10_batch(const std::string& path) {
  constexpr uint64_t kPixels = 3 * 32 * 32, kRecord = 1 + kPixels;
  constexpr uint64_t kMaxRecords = 1000000;  // a real batch has 10000; the cap bounds a .gz file
  detail::FileReader r(path, "cifar10");
  DG_CHECK(r.compressed() || (r.file_size() > 0 && r.file_size() % kRecord == 0), "cifar10: '", path,
           "': expected a multiple of ", kRecord, " bytes (1 label + 3072 pixels per record), found ",
           r.file_size(), " bytes", r.file_size() > 0 ? " (truncated?)" : "");
  std::vector<uint8_t> bytes = r.read_to_end(kMaxRecords * kRecord, "a CIFAR-10 batch");
  DG_CHECK(!bytes.empty() && bytes.size() % kRecord == 0, "cifar10: '", path, "': expected a multiple of ", kRecord,
           " bytes (1 label + 3072 pixels per record) after decompression, found ", bytes.size(), " bytes");
  const size_t n = bytes.size() / kRecord;
  std::vector<uint8_t> pixels(n * kPixels);
  std::vector<int64_t> labels(n);
  for (size_t i = 0; i < n; ++i) {
    const uint8_t* rec = bytes.data() + i * kRecord;
    DG_CHECK(rec[0] < 10, "cifar10: '", path, "': record ", i, " (offset ", i * kRecord, ") has label ", int(rec[0]),
             ", expected < 10");
    labels[i] = rec[0];
    std::copy_n(rec + 1, kPixels, pixels.data() + i * kPixels);
  }
  return Dataset::from_uint8(std::move(pixels), {static_cast<int64_t>(n), 3, 32, 32}, std::move(labels), 10, path);
}

/// CIFAR-10 (torchvision.datasets.CIFAR10): 50000 train images (data_batch_1..5.bin) or 10000
/// test images (test_batch.bin), (3, 32, 32) uint8, 10 classes. Looks in dir and in
/// dir/cifar-10-batches-bin (what the archive extracts to).
inline Dataset load_cifar10(const std::string& dir, bool train = true) {
  const char* hint =
      "Download https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz and extract it there "
      "(tar xzf cifar-10-binary.tar.gz gives cifar-10-batches-bin/)";
  std::error_code ec;
  DG_CHECK(std::filesystem::is_directory(dir, ec), "load_cifar10: directory '", dir, "' not found. ", hint);
  std::vector<std::string> names;
  if (train)
    for (int i = 1; i <= 5; ++i) names.push_back("data_batch_" + std::to_string(i) + ".bin");
  else
    names.push_back("test_batch.bin");
  std::vector<uint8_t> pixels;
  std::vector<int64_t> labels;
  for (const auto& name : names) {
    std::string tried;
    std::string path = detail::find_first({dir, dir + "/cifar-10-batches-bin"}, {name}, tried);
    DG_CHECK(!path.empty(), "load_cifar10: no ", name, " in '", dir, "' (tried ", tried, "). ", hint);
    Dataset b = read_cifar10_batch(path);
    pixels.insert(pixels.end(), b.uint8_data(), b.uint8_data() + b.size() * b.sample_numel());
    labels.insert(labels.end(), b.labels().begin(), b.labels().end());
  }
  const auto n = static_cast<int64_t>(labels.size());
  return Dataset::from_uint8(std::move(pixels), {n, 3, 32, 32}, std::move(labels), 10, dir);
}

/// CIFAR-10 class names, by label.
inline const std::array<const char*, 10>& cifar10_classes() {
  static const std::array<const char*, 10> names = {"airplane", "automobile", "bird",  "cat",  "deer",
                                                    "dog",      "frog",       "horse", "ship", "truck"};
  return names;
}

}  // namespace dg::data

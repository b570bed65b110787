// tests/test_data.cpp: the data library: IDX (plain and gzip) and CIFAR-10 parsing, including
// malformed files; the real Fashion-MNIST; the synthetic dataset; augmentation (crop, flip,
// normalize, erasing, Beta sampling, mixup/cutmix targets); the threaded, sharded DataLoader.
#include "test_util.hpp"

#include <unistd.h>  // getpid
#include <zlib.h>

#include <atomic>
#include <chrono>
#include <filesystem>
#include <fstream>
#include <set>

#include <densegrad/data/data.hpp>

namespace test_data {

using dg::Tensor;
namespace data = dg::data;
namespace fs = std::filesystem;

namespace {

// A fresh directory under the system temp dir, removed at the end of the test.
struct TempDir {
  fs::path path;
  explicit TempDir(const std::string& name) {
    path = fs::temp_directory_path() / ("densegrad_test_data_" + name + "_" + std::to_string(::getpid()));
    fs::remove_all(path);
    fs::create_directories(path);
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path, ec);
  }
  std::string operator/(const std::string& f) const { return (path / f).string(); }
};

using Bytes = std::vector<uint8_t>;

void write_file(const std::string& path, const Bytes& b) {
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  f.write(reinterpret_cast<const char*>(b.data()), static_cast<std::streamsize>(b.size()));
}
Bytes read_bytes(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  return Bytes(std::istreambuf_iterator<char>(f), {});
}
// A gzip file written with zlib, as gzip(1) would.
void write_gz(const std::string& path, const Bytes& b) {
  gzFile f = gzopen(path.c_str(), "wb9");
  REQUIRE(f != nullptr);
  if (!b.empty()) REQUIRE(gzwrite(f, b.data(), static_cast<unsigned>(b.size())) == static_cast<int>(b.size()));
  REQUIRE(gzclose(f) == Z_OK);
}
void put_be32(Bytes& b, uint32_t v) {
  for (int s = 24; s >= 0; s -= 8) b.push_back(static_cast<uint8_t>(v >> s));
}
// IDX bytes: magic 0x000008<ndim>, big-endian dims, then the data.
Bytes idx_bytes(const std::vector<uint32_t>& dims, const Bytes& payload) {
  Bytes b;
  put_be32(b, 0x800u + static_cast<uint32_t>(dims.size()));
  for (uint32_t d : dims) put_be32(b, d);
  b.insert(b.end(), payload.begin(), payload.end());
  return b;
}
Bytes iota_bytes(size_t n, int start = 0) {
  Bytes b(n);
  for (size_t i = 0; i < n; ++i) b[i] = static_cast<uint8_t>((start + static_cast<int>(i) * 7) & 255);
  return b;
}

// 3 images of 4x5 and their labels.
const Bytes kPixels = iota_bytes(3 * 4 * 5);
const Bytes kLabels = {7, 0, 9};

}  // namespace

// ---------------------------------------------------------------- IDX

TEST_CASE("idx images and labels round trip, plain and gzip") {
  TempDir dir("idx_roundtrip");
  for (bool gz : {false, true}) {
    INFO((gz ? "gzip" : "plain"));
    const std::string im = dir / (gz ? "im.gz" : "im"), lb = dir / (gz ? "lb.gz" : "lb");
    auto write = gz ? write_gz : write_file;
    write(im, idx_bytes({3, 4, 5}, kPixels));
    write(lb, idx_bytes({3}, kLabels));
    data::IdxData d = data::read_idx_images(im);
    REQUIRE(d.dims == dg::Shape{3, 4, 5});
    REQUIRE(d.bytes == kPixels);
    REQUIRE(data::read_idx_labels(lb).bytes == kLabels);

    data::Dataset ds = data::load_idx(im, lb, 10);
    REQUIRE(ds.shape() == dg::Shape{3, 1, 4, 5});
    REQUIRE(ds.is_uint8());
    REQUIRE(ds.labels() == std::vector<int64_t>{7, 0, 9});
    REQUIRE(ds.name() == im);
    Tensor<float> img = ds.image(2);  // ToTensor: bytes / 255
    REQUIRE(img.shape() == dg::Shape{1, 4, 5});
    for (int64_t j = 0; j < 20; ++j) REQUIRE(img.data()[j] == float(kPixels[size_t(40 + j)]) / 255.0f);
  }
  // a gzip file with zero images is valid and gives an empty dataset
  write_gz(dir / "empty.gz", idx_bytes({0, 28, 28}, {}));
  write_gz(dir / "empty_lb.gz", idx_bytes({0}, {}));
  REQUIRE(data::load_idx(dir / "empty.gz", dir / "empty_lb.gz").size() == 0);
}

TEST_CASE("idx truncated at every offset: dg::Error naming the file") {
  TempDir dir("idx_truncated");
  const Bytes images = idx_bytes({3, 4, 5}, kPixels), labels = idx_bytes({3}, kLabels);
  for (const Bytes* full : {&images, &labels}) {
    const bool is_images = full == &images;
    for (size_t cut = 0; cut < full->size(); ++cut) {
      const std::string p = dir / ("cut_" + std::to_string(cut));
      write_file(p, Bytes(full->begin(), full->begin() + static_cast<long>(cut)));
      INFO("plain, cut at " << cut);
      if (is_images) REQUIRE_THROWS_WITH(data::read_idx_images(p), Catch::Contains(p));
      else REQUIRE_THROWS_WITH(data::read_idx_labels(p), Catch::Contains(p));
    }
  }
  // a gzip file cut anywhere: in its header, its deflate stream, or its CRC/length trailer
  write_gz(dir / "full.gz", images);
  const Bytes gz = read_bytes(dir / "full.gz");
  REQUIRE(gz.size() > 20);
  for (size_t cut = 0; cut < gz.size(); ++cut) {
    const std::string p = dir / ("gzcut_" + std::to_string(cut) + ".gz");
    write_file(p, Bytes(gz.begin(), gz.begin() + static_cast<long>(cut)));
    INFO("gzip, cut at " << cut << " of " << gz.size());
    REQUIRE_THROWS_WITH(data::read_idx_images(p), Catch::Contains(p));
  }
  // a messages says what was expected and what was found
  write_file(dir / "short", Bytes(images.begin(), images.end() - 1));
  REQUIRE_THROWS_WITH(data::read_idx_images(dir / "short"),
                      Catch::Contains("need 16 header bytes + 60 data bytes, but the file has 75 bytes"));
}

TEST_CASE("idx wrong magic, trailing bytes, bad dims") {
  TempDir dir("idx_magic");
  write_file(dir / "labels", idx_bytes({3}, kLabels));
  REQUIRE_THROWS_WITH(data::read_idx_images(dir / "labels"),
                      Catch::Contains(dir / "labels") && Catch::Contains("expected magic 0x00000803") &&
                          Catch::Contains("found 0x00000801"));
  Bytes floats = idx_bytes({3, 4, 5}, kPixels);
  floats[2] = 0x0D;  // IDX float type
  write_file(dir / "floats", floats);
  REQUIRE_THROWS_WITH(data::read_idx_images(dir / "floats"), Catch::Contains("found 0x00000d03"));
  write_file(dir / "text", Bytes{'h', 'e', 'l', 'l', 'o', ' ', 'w', 'o', 'r', 'l', 'd', '!', '!', '!', '!', '!'});
  REQUIRE_THROWS_WITH(data::read_idx_images(dir / "text"), Catch::Contains("not an IDX file"));

  Bytes trailing = idx_bytes({3, 4, 5}, kPixels);
  trailing.push_back(0);
  write_file(dir / "trailing", trailing);
  REQUIRE_THROWS_WITH(data::read_idx_images(dir / "trailing"), Catch::Contains("trailing bytes"));
  write_gz(dir / "trailing.gz", trailing);
  REQUIRE_THROWS_WITH(data::read_idx_images(dir / "trailing.gz"),
                      Catch::Contains(dir / "trailing.gz") && Catch::Contains("trailing bytes"));

  write_file(dir / "zero_h", idx_bytes({3, 0, 5}, {}));
  REQUIRE_THROWS_WITH(data::read_idx_images(dir / "zero_h"), Catch::Contains("dim 1 is 0"));
  REQUIRE_THROWS_WITH(data::read_idx_images(dir / "missing"),
                      Catch::Contains(dir / "missing") && Catch::Contains("no such file"));
}

TEST_CASE("idx huge dims are refused before any big allocation") {
  TempDir dir("idx_huge");
  // product overflows 64 bits
  write_file(dir / "overflow", idx_bytes({0xFFFFFFFFu, 0xFFFFFFFFu, 0xFFFFFFFFu}, kPixels));
  REQUIRE_THROWS_WITH(data::read_idx_images(dir / "overflow"), Catch::Contains("overflow 64 bits"));
  write_gz(dir / "overflow.gz", idx_bytes({0xFFFFFFFFu, 0xFFFFFFFFu, 0xFFFFFFFFu}, kPixels));
  REQUIRE_THROWS_WITH(data::read_idx_images(dir / "overflow.gz"), Catch::Contains("overflow 64 bits"));
  // 60000 x 28 x 28 claimed by a 76-byte file
  write_file(dir / "claims", idx_bytes({60000, 28, 28}, kPixels));
  REQUIRE_THROWS_WITH(data::read_idx_images(dir / "claims"),
                      Catch::Contains("47040000 data bytes, but the file has 76 bytes"));
  // a tiny gzip claiming terabytes: more than deflate can hold in that many bytes
  write_gz(dir / "claims.gz", idx_bytes({0xFFFFFFFFu, 0xFFFF, 0xFFFF}, kPixels));
  REQUIRE_THROWS_WITH(data::read_idx_images(dir / "claims.gz"),
                      Catch::Contains(dir / "claims.gz") && Catch::Contains("can hold at most"));
  // a gzip within that bound whose data runs out: found by reading, chunk by chunk
  write_gz(dir / "short.gz", idx_bytes({60, 28, 28}, Bytes(5000, 0)));  // 52 bytes: may hold 53664
  REQUIRE_THROWS_WITH(data::read_idx_images(dir / "short.gz"),
                      Catch::Contains(dir / "short.gz") && Catch::Contains("expected 47040 bytes of data") &&
                          Catch::Contains("found 5000"));
}

TEST_CASE("idx label count mismatch and label out of range") {
  TempDir dir("idx_labels");
  write_file(dir / "im", idx_bytes({3, 4, 5}, kPixels));
  write_file(dir / "lb2", idx_bytes({2}, {1, 2}));
  REQUIRE_THROWS_WITH(data::load_idx(dir / "im", dir / "lb2"),
                      Catch::Contains("has 3 images but") && Catch::Contains(dir / "lb2") &&
                          Catch::Contains("has 2 labels"));
  write_file(dir / "lb10", idx_bytes({3}, {1, 10, 2}));
  REQUIRE_THROWS_WITH(data::load_idx(dir / "im", dir / "lb10", 10),
                      Catch::Contains(dir / "lb10") && Catch::Contains("label 1 is 10, expected < 10"));
  REQUIRE_NOTHROW(data::load_idx(dir / "im", dir / "lb10", 11));
}

TEST_CASE("load_fashion_mnist: missing directory or files say how to get them") {
  REQUIRE_THROWS_WITH(data::load_fashion_mnist("/nonexistent/fashion", true),
                      Catch::Contains("/nonexistent/fashion") && Catch::Contains("apt-get install dataset-fashion-mnist"));
  TempDir dir("fmnist_layout");
  REQUIRE_THROWS_WITH(data::load_fashion_mnist(dir.path.string(), false),
                      Catch::Contains("no t10k images") && Catch::Contains("t10k-images-idx3-ubyte.gz"));
  // torchvision's layout, plain files, is found too
  fs::create_directories(dir.path / "FashionMNIST" / "raw");
  write_file(dir / "FashionMNIST/raw/t10k-images-idx3-ubyte", idx_bytes({3, 4, 5}, kPixels));
  write_gz(dir / "FashionMNIST/raw/t10k-labels-idx1-ubyte.gz", idx_bytes({3}, kLabels));
  data::Dataset ds = data::load_fashion_mnist(dir.path.string(), false);
  REQUIRE(ds.size() == 3);
  REQUIRE(ds.label(0) == 7);
}

TEST_CASE("Fashion-MNIST from the installed dataset") {
  const std::string dir = data::default_fashion_mnist_dir();
  if (!fs::exists(dir + "/train-images-idx3-ubyte.gz") && !fs::exists(dir + "/train-images-idx3-ubyte")) {
    WARN("Fashion-MNIST not found in " << dir << " (apt-get install dataset-fashion-mnist); test skipped");
    return;
  }
  data::Dataset train = data::load_fashion_mnist(dir, true), test = data::load_fashion_mnist(dir, false);
  REQUIRE(train.shape() == dg::Shape{60000, 1, 28, 28});
  REQUIRE(test.shape() == dg::Shape{10000, 1, 28, 28});
  REQUIRE(train.num_classes() == 10);
  REQUIRE(train.class_counts() == std::vector<int64_t>(10, 6000));  // balanced, labels < 10
  REQUIRE(test.class_counts() == std::vector<int64_t>(10, 1000));
  // first labels and first image's pixel sum, as Python's gzip module reads them
  REQUIRE(std::vector<int64_t>(train.labels().begin(), train.labels().begin() + 5) ==
          std::vector<int64_t>{9, 0, 0, 3, 0});
  REQUIRE(std::vector<int64_t>(test.labels().begin(), test.labels().begin() + 5) ==
          std::vector<int64_t>{9, 2, 1, 1, 6});
  int64_t sum = 0;
  for (int j = 0; j < 784; ++j) sum += train.uint8_data()[j];
  REQUIRE(sum == 76247);
  double mean = 0;
  for (int64_t j = 0; j < train.size() * 784; ++j) mean += train.uint8_data()[j];
  REQUIRE(mean / (60000.0 * 784 * 255) == Approx(0.2860406).epsilon(1e-6));
  REQUIRE(std::string(data::fashion_mnist_classes()[9]) == "Ankle boot");
}

// ---------------------------------------------------------------- CIFAR-10

namespace {
// n CIFAR records: label i % 10, pixel j of record i = (i + j) & 255.
Bytes cifar_records(int n, int first_label = 0) {
  Bytes b;
  for (int i = 0; i < n; ++i) {
    b.push_back(static_cast<uint8_t>((first_label + i) % 10));
    for (int j = 0; j < 3072; ++j) b.push_back(static_cast<uint8_t>((i + j) & 255));
  }
  return b;
}
}  // namespace

TEST_CASE("cifar10 record parsing from a synthetic batch file") {
  TempDir dir("cifar");
  write_file(dir / "batch.bin", cifar_records(3, 4));
  data::Dataset ds = data::read_cifar10_batch(dir / "batch.bin");
  REQUIRE(ds.shape() == dg::Shape{3, 3, 32, 32});
  REQUIRE(ds.labels() == std::vector<int64_t>{4, 5, 6});
  // red plane first, then green, then blue: the record is already (C, H, W)
  const uint8_t* p = ds.uint8_data() + 2 * 3072;
  REQUIRE(p[0] == 2);
  REQUIRE(p[1024] == ((2 + 1024) & 255));
  REQUIRE(p[3071] == ((2 + 3071) & 255));
  write_gz(dir / "batch.bin.gz", cifar_records(3, 4));
  REQUIRE(data::read_cifar10_batch(dir / "batch.bin.gz").labels() == ds.labels());

  Bytes bad = cifar_records(2);
  bad.pop_back();
  write_file(dir / "short.bin", bad);
  REQUIRE_THROWS_WITH(data::read_cifar10_batch(dir / "short.bin"),
                      Catch::Contains(dir / "short.bin") && Catch::Contains("expected a multiple of 3073 bytes") &&
                          Catch::Contains("found 6145 bytes"));
  write_gz(dir / "short.bin.gz", bad);
  REQUIRE_THROWS_WITH(data::read_cifar10_batch(dir / "short.bin.gz"), Catch::Contains("found 6145 bytes"));
  write_file(dir / "empty.bin", {});
  REQUIRE_THROWS_WITH(data::read_cifar10_batch(dir / "empty.bin"), Catch::Contains("found 0 bytes"));
  Bytes label11 = cifar_records(2);
  label11[3073] = 11;
  write_file(dir / "label.bin", label11);
  REQUIRE_THROWS_WITH(data::read_cifar10_batch(dir / "label.bin"),
                      Catch::Contains("record 1 (offset 3073) has label 11, expected < 10"));
}

TEST_CASE("load_cifar10 finds the extracted batches or says where to get them") {
  REQUIRE_THROWS_WITH(data::load_cifar10("/nonexistent/cifar", true),
                      Catch::Contains("https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"));
  TempDir dir("cifar_dir");
  fs::create_directories(dir.path / "cifar-10-batches-bin");
  for (int i = 1; i <= 5; ++i)
    write_file(dir / ("cifar-10-batches-bin/data_batch_" + std::to_string(i) + ".bin"), cifar_records(2, i));
  data::Dataset train = data::load_cifar10(dir.path.string(), true);
  REQUIRE(train.size() == 10);
  REQUIRE(train.labels() == std::vector<int64_t>{1, 2, 2, 3, 3, 4, 4, 5, 5, 6});
  REQUIRE_THROWS_WITH(data::load_cifar10(dir.path.string(), false),
                      Catch::Contains("no test_batch.bin") && Catch::Contains("cifar-10-binary.tar.gz"));
}

// ---------------------------------------------------------------- Dataset and synthetic

TEST_CASE("Dataset checks its geometry and labels") {
  REQUIRE_THROWS_WITH(data::Dataset::from_uint8(Bytes(10), {2, 1, 2, 2}, {0, 1}, 2, "mine"),
                      Catch::Contains("mine: shape [2, 1, 2, 2] needs 8 pixels, got 10"));
  REQUIRE_THROWS_WITH(data::Dataset::from_float(std::vector<float>(8), {2, 1, 2, 2}, {0}, 2, "mine"),
                      Catch::Contains("2 images but 1 labels"));
  REQUIRE_THROWS_WITH(data::Dataset::from_float(std::vector<float>(8), {2, 1, 2, 2}, {0, 2}, 2, "mine"),
                      Catch::Contains("label 1 is 2, expected 0 <= label < 2"));
  auto ds = data::Dataset::from_float({1, 2, 3, 4, 5, 6, 7, 8}, {2, 1, 2, 2}, {0, 1}, 2, "mine");
  REQUIRE_THROWS_WITH(ds.image(2), Catch::Contains("sample index 2 out of range for 2 samples"));
  data::Dataset sub = ds.subset({1, 1, 0});
  REQUIRE(sub.labels() == std::vector<int64_t>{1, 1, 0});
  REQUIRE(sub.image(2).to_vector() == std::vector<float>{1, 2, 3, 4});
}

TEST_CASE("synthetic dataset: deterministic, balanced, learnable") {
  auto opt = data::SyntheticOptions().samples(400).image(3, 8, 9).classes(4).with_seed(5);
  data::Dataset a = data::make_synthetic(opt), b = data::make_synthetic(opt);
  REQUIRE(a.shape() == dg::Shape{400, 3, 8, 9});
  REQUIRE(!a.is_uint8());
  REQUIRE(std::equal(a.float_data(), a.float_data() + 400 * 216, b.float_data()));
  REQUIRE(a.labels() == b.labels());
  REQUIRE(a.class_counts() == std::vector<int64_t>(4, 100));
  data::Dataset c = data::make_synthetic(opt.with_seed(6));
  REQUIRE(!std::equal(a.float_data(), a.float_data() + 400 * 216, c.float_data()));
  for (int64_t j = 0; j < 400 * 216; ++j) REQUIRE((a.float_data()[j] >= 0 && a.float_data()[j] <= 1));
  // nearest class mean, fitted on the first half, classifies the second half
  const int64_t n = 216;
  std::vector<double> mean(4 * n, 0.0);
  for (int64_t i = 0; i < 200; ++i)
    for (int64_t j = 0; j < n; ++j) mean[a.label(i) * n + j] += a.float_data()[i * n + j] / 50.0;
  int correct = 0;
  for (int64_t i = 200; i < 400; ++i) {
    int best = 0;
    double best_d = 1e300;
    for (int k = 0; k < 4; ++k) {
      double d = 0;
      for (int64_t j = 0; j < n; ++j) d += std::pow(a.float_data()[i * n + j] - mean[k * n + j], 2);
      if (d < best_d) best_d = d, best = k;
    }
    correct += best == a.label(i);
  }
  REQUIRE(correct >= 190);
}

// ---------------------------------------------------------------- augmentation

TEST_CASE("random crop: padding 0 is the identity, padding p is a shift with zero fill") {
  dg::Generator gen(1);
  Tensor<float> x = dg::rand<float>({2, 3, 5, 7}, gen, 0.5, 1.0);  // no zeros in x
  REQUIRE(data::random_crop(x, 0, gen).to_vector() == x.to_vector());
  for (int trial = 0; trial < 20; ++trial) {
    Tensor<float> y = data::random_crop(x.select(0, 0).contiguous(), 2, gen);
    REQUIRE(y.shape() == dg::Shape{3, 5, 7});
    int matches = 0;  // exactly one shift (dy, dx) in [-2, 2]^2 explains y
    for (int dy = -2; dy <= 2; ++dy)
      for (int dx = -2; dx <= 2; ++dx) {
        bool ok = true;
        for (int64_t c = 0; c < 3 && ok; ++c)
          for (int64_t r = 0; r < 5 && ok; ++r)
            for (int64_t q = 0; q < 7 && ok; ++q) {
              int64_t sy = r + dy, sx = q + dx;
              float want = sy >= 0 && sy < 5 && sx >= 0 && sx < 7 ? x.at({0, c, sy, sx}) : 0.0f;
              ok = y.at({c, r, q}) == want;
            }
        matches += ok;
      }
    REQUIRE(matches == 1);
  }
  REQUIRE_THROWS_WITH(data::random_crop(x, -1, gen), Catch::Contains("padding must be >= 0"));
  REQUIRE_THROWS_WITH(data::random_crop(dg::zeros<float>({5, 7}), 1, gen), Catch::Contains("expected an image"));
}

TEST_CASE("hflip: twice is the identity, once mirrors each row") {
  dg::Generator gen(2);
  Tensor<float> x = dg::randn<float>({2, 3, 4, 5}, gen);
  Tensor<float> y = data::hflip(x);
  REQUIRE(y.at({1, 2, 3, 0}) == x.at({1, 2, 3, 4}));
  REQUIRE(y.at({0, 1, 2, 1}) == x.at({0, 1, 2, 3}));
  REQUIRE(data::hflip(y).to_vector() == x.to_vector());
  REQUIRE(data::hflip(x.transpose(2, 3)).at({0, 0, 0, 0}) == x.at({0, 0, 3, 0}));  // non-contiguous input
}

TEST_CASE("normalize: per-channel mean 0 and std 1 with the data's own statistics") {
  dg::Generator gen(3);
  Tensor<float> x = dg::rand<float>({4, 3, 6, 6}, gen);
  std::vector<float> mean(3), stdev(3);
  for (int64_t c = 0; c < 3; ++c) {
    double s = 0, s2 = 0;
    for (int64_t i = 0; i < 4; ++i)
      for (int64_t j = 0; j < 36; ++j) {
        double v = x.data()[(i * 3 + c) * 36 + j];
        s += v, s2 += v * v;
      }
    mean[c] = float(s / 144);
    stdev[c] = float(std::sqrt(s2 / 144 - (s / 144) * (s / 144)));
  }
  Tensor<float> y = data::normalize(x, mean, stdev);
  for (int64_t c = 0; c < 3; ++c) {
    double s = 0, s2 = 0;
    for (int64_t i = 0; i < 4; ++i)
      for (int64_t j = 0; j < 36; ++j) {
        double v = y.data()[(i * 3 + c) * 36 + j];
        s += v, s2 += v * v;
      }
    REQUIRE(s / 144 == Approx(0).margin(1e-5));
    REQUIRE(s2 / 144 == Approx(1).epsilon(1e-4));
  }
  REQUIRE_THROWS_WITH(data::normalize(x, {0.5f}, {0.5f}), Catch::Contains("one mean and one std per channel (3)"));
  REQUIRE_THROWS_WITH(data::normalize(x, {0, 0, 0}, {1, 0, 1}), Catch::Contains("std must be > 0"));
}

TEST_CASE("random erasing: one box of the allowed area, filled per mode") {
  dg::Generator gen(4);
  const int64_t H = 32, W = 32;
  Tensor<float> x = dg::full<float>({1, 3, H, W}, 5.0f);
  REQUIRE(data::random_erasing(x, data::AugmentOptions().random_erasing(0.0), gen).to_vector() == x.to_vector());
  for (data::EraseMode mode : {data::EraseMode::Zero, data::EraseMode::Pixel, data::EraseMode::Channel}) {
    for (int trial = 0; trial < 20; ++trial) {
      Tensor<float> y = data::random_erasing(x, data::AugmentOptions().random_erasing(1.0, mode), gen);
      int64_t y0 = H, y1 = -1, x0 = W, x1 = -1, changed = 0;
      for (int64_t r = 0; r < H; ++r)
        for (int64_t q = 0; q < W; ++q)
          if (y.at({0, 0, r, q}) != 5.0f) {
            ++changed;
            y0 = std::min(y0, r), y1 = std::max(y1, r), x0 = std::min(x0, q), x1 = std::max(x1, q);
          }
      const int64_t area = (y1 - y0 + 1) * (x1 - x0 + 1);
      REQUIRE(changed == area);  // a filled rectangle
      // area U(0.02, 1/3) * H * W, then rounded sides: allow the rounding
      REQUIRE(area >= 0.02 * H * W * 0.5);
      REQUIRE(area <= H * W / 3.0 * 1.5);
      if (mode == data::EraseMode::Zero) REQUIRE(y.at({0, 2, y0, x0}) == 0.0f);
      if (mode == data::EraseMode::Channel) REQUIRE(y.at({0, 1, y0, x0}) == y.at({0, 1, y1, x1}));
      if (mode == data::EraseMode::Pixel) REQUIRE(y.at({0, 1, y0, x0}) != y.at({0, 1, y1, x1}));
    }
  }
}

TEST_CASE("Beta sampler: mean and variance of Beta(0.8, 0.8) over 20k draws, and Gamma means") {
  dg::Generator gen(5);
  const int n = 20000;
  double s = 0, s2 = 0;
  for (int i = 0; i < n; ++i) {
    double v = data::sample_beta(0.8, 0.8, gen);
    REQUIRE((v >= 0 && v <= 1));
    s += v, s2 += v * v;
  }
  const double mean = s / n, var = s2 / n - mean * mean;
  // margins are about 4.5 standard errors, so any sound generator stream passes
  REQUIRE(mean == Approx(0.5).margin(0.01));  // std error 0.0022
  REQUIRE(var == Approx(0.64 / (2.56 * 2.6)).margin(0.004));  // ab / ((a+b)^2 (a+b+1)) = 0.0962; std error < 0.0009
  for (double alpha : {0.3, 1.0, 2.5}) {
    double g = 0;
    for (int i = 0; i < n; ++i) g += data::sample_gamma(alpha, gen);
    REQUIRE(g / n == Approx(alpha).margin(5 * std::sqrt(alpha / n)));  // mean alpha, std error sqrt(alpha / n)
  }
  double b = 0;
  for (int i = 0; i < n; ++i) b += data::sample_beta(2.0, 6.0, gen);
  REQUIRE(b / n == Approx(0.25).margin(0.005));  // std error 0.001
  REQUIRE_THROWS_WITH(data::sample_gamma(0.0, gen), Catch::Contains("alpha must be positive"));
}

TEST_CASE("cutmix box: area follows lambda, lambda corrected to the clipped box") {
  dg::Generator gen(6);
  for (double lam : {0.1, 0.5, 0.75, 0.99}) {
    const int64_t H = 32, W = 24;
    const int64_t cut_h = int64_t(H * std::sqrt(1 - lam)), cut_w = int64_t(W * std::sqrt(1 - lam));
    for (int trial = 0; trial < 50; ++trial) {
      data::Box b = data::cutmix_box(H, W, lam, gen);
      REQUIRE((0 <= b.y0 && b.y0 <= b.y1 && b.y1 <= H && 0 <= b.x0 && b.x0 <= b.x1 && b.x1 <= W));
      REQUIRE(b.area() <= (cut_h / 2 * 2) * (cut_w / 2 * 2));
      if (b.y0 > 0 && b.y1 < H && b.x0 > 0 && b.x1 < W)  // not clipped: exactly the rounded box
        REQUIRE(b.area() == (cut_h / 2 * 2) * (cut_w / 2 * 2));
    }
  }
  // through mix_batch_: the box is swapped between samples i and B-1-i, lam = 1 - area / (H W)
  const int64_t B = 5, C = 2, H = 16, W = 16;
  Tensor<float> x = dg::randn<float>({B, C, H, W}, gen);
  auto opt = data::AugmentOptions().cutmix(1.0);
  int boxes = 0;
  for (int trial = 0; trial < 30; ++trial) {
    Tensor<float> y = x.clone();
    data::MixInfo m = data::mix_batch_(y, opt, gen);
    REQUIRE(m.cutmix);
    const data::Box& b = m.box;
    REQUIRE(m.lam == Approx(1.0 - double(b.area()) / (H * W)));
    boxes += b.area() > 0;
    for (int64_t i = 0; i < B; ++i)
      for (int64_t c = 0; c < C; ++c)
        for (int64_t r = 0; r < H; ++r)
          for (int64_t q = 0; q < W; ++q) {
            bool in = r >= b.y0 && r < b.y1 && q >= b.x0 && q < b.x1;
            REQUIRE(y.at({i, c, r, q}) == x.at({in ? B - 1 - i : i, c, r, q}));
          }
  }
  REQUIRE(boxes > 20);
}

TEST_CASE("mixup: images blend with the flipped batch, soft targets lam / 1-lam on the right classes") {
  dg::Generator gen(7);
  const int64_t B = 6, K = 5;
  Tensor<float> x = dg::randn<float>({B, 3, 4, 4}, gen);
  Tensor<int64_t> y = dg::tensor<int64_t>({0, 1, 2, 3, 4, 4});
  auto opt = data::AugmentOptions().mixup(0.8);
  for (int trial = 0; trial < 10; ++trial) {
    Tensor<float> img = x.clone();
    data::MixInfo m;
    Tensor<float> t = data::mixup_(img, y, K, opt, gen, &m);
    REQUIRE(!m.cutmix);
    REQUIRE((m.lam > 0 && m.lam < 1));
    REQUIRE(t.shape() == dg::Shape{B, K});
    const float lam = float(m.lam);
    for (int64_t i = 0; i < B; ++i) {
      float row = 0;
      for (int64_t k = 0; k < K; ++k) row += t.at({i, k});
      REQUIRE(row == Approx(1.0f).epsilon(1e-6));
      const int64_t a = y.at({i}), b = y.at({B - 1 - i});
      if (a != b) {
        REQUIRE(t.at({i, a}) == Approx(lam).epsilon(1e-6));
        REQUIRE(t.at({i, b}) == Approx(1 - lam).epsilon(1e-6));
      } else {
        REQUIRE(t.at({i, a}) == Approx(1.0f));
      }
      for (int64_t j = 0; j < 48; ++j)
        REQUIRE(img.data()[i * 48 + j] ==
                Approx(lam * x.data()[i * 48 + j] + (1 - lam) * x.data()[(B - 1 - i) * 48 + j]).margin(1e-6));
    }
  }
  // both enabled: switch_prob 0.5 picks each about half the time
  auto both = data::AugmentOptions().mixup(0.8).cutmix(1.0);
  int cutmixes = 0;
  for (int trial = 0; trial < 400; ++trial) {
    Tensor<float> img = x.clone();
    cutmixes += data::mix_batch_(img, both, gen).cutmix;
  }
  REQUIRE((cutmixes > 150 && cutmixes < 250));
  // mix_prob 0: nothing mixed, lam 1
  Tensor<float> img = x.clone();
  REQUIRE(data::mix_batch_(img, both.mix(0.0), gen).lam == 1.0);
  REQUIRE(img.to_vector() == x.to_vector());
}

TEST_CASE("mixup_target folds label smoothing in like timm") {
  Tensor<int64_t> y = dg::tensor<int64_t>({3, 1, 0});
  Tensor<float> t = data::mixup_target(y, 10, 1.0, 0.1);  // off = 0.1/10, on = 1 - 0.1 + off
  for (int64_t i = 0; i < 3; ++i)
    for (int64_t k = 0; k < 10; ++k)
      REQUIRE(t.at({i, k}) == Approx(k == y.at({i}) ? 0.91f : 0.01f).epsilon(1e-6));
  Tensor<float> m = data::mixup_target(y, 10, 0.7, 0.1);
  REQUIRE(m.at({0, 3}) == Approx(0.7 * 0.91 + 0.3 * 0.01).epsilon(1e-6));
  REQUIRE(m.at({0, 0}) == Approx(0.7 * 0.01 + 0.3 * 0.91).epsilon(1e-6));
  REQUIRE(m.at({1, 1}) == Approx(0.91).epsilon(1e-6));  // middle sample mixes with itself
  REQUIRE(m.at({0, 5}) == Approx(0.01).epsilon(1e-6));
  REQUIRE_THROWS_WITH(data::mixup_target(y, 3, 1.0, 0.0), Catch::Contains("label 0 is 3, expected in [0, 3)"));
}

// ---------------------------------------------------------------- DataLoader

namespace {
data::Dataset small_synthetic(int64_t n = 37) {
  return data::make_synthetic(data::SyntheticOptions().samples(n).image(2, 6, 5).classes(4).with_seed(9));
}
std::vector<int64_t> all_indices(data::DataLoader& loader) {
  std::vector<int64_t> idx;
  for (data::Batch& b : loader) idx.insert(idx.end(), b.indices.begin(), b.indices.end());
  return idx;
}
}  // namespace

TEST_CASE("loader: every sample exactly once per epoch, batch count with and without drop_last") {
  data::Dataset ds = small_synthetic(37);
  for (int workers : {0, 2}) {
    data::DataLoader loader(ds, data::LoaderOptions().batch(8).workers(workers));
    REQUIRE(loader.size() == 5);
    std::vector<int64_t> sizes;
    std::vector<int64_t> seen;
    for (data::Batch& b : loader) {
      sizes.push_back(b.size());
      REQUIRE(b.images.shape() == dg::Shape{b.size(), 2, 6, 5});
      REQUIRE(!b.soft_targets.defined());
      for (int64_t i = 0; i < b.size(); ++i) {
        REQUIRE(b.labels.at({i}) == ds.label(b.indices[size_t(i)]));
        Tensor<float> img = ds.image(b.indices[size_t(i)]);  // no augmentation: the image itself
        REQUIRE(std::equal(img.data(), img.data() + 60, b.images.data() + i * 60));
      }
      seen.insert(seen.end(), b.indices.begin(), b.indices.end());
    }
    REQUIRE(sizes == std::vector<int64_t>{8, 8, 8, 8, 5});
    std::sort(seen.begin(), seen.end());
    std::vector<int64_t> expect(37);
    std::iota(expect.begin(), expect.end(), 0);
    REQUIRE(seen == expect);

    data::DataLoader dropping(ds, data::LoaderOptions().batch(8).workers(workers).drop_last_batch(true));
    REQUIRE(dropping.size() == 4);
    REQUIRE(all_indices(dropping).size() == 32);
  }
  data::DataLoader in_order(ds, data::LoaderOptions().batch(10).shuffled(false));
  std::vector<int64_t> expect(37);
  std::iota(expect.begin(), expect.end(), 0);
  REQUIRE(all_indices(in_order) == expect);
}

TEST_CASE("loader: batches identical for 0, 1 and 3 workers, with augmentation and mixup") {
  data::Dataset ds = small_synthetic(50);
  auto aug = data::AugmentOptions()
                 .crop(2)
                 .flip()
                 .normalize({0.5f, 0.4f}, {0.25f, 0.3f})
                 .random_erasing(0.5)
                 .mixup(0.8)
                 .cutmix(1.0)
                 .smoothing(0.1);
  std::vector<std::vector<data::Batch>> runs;
  for (int workers : {0, 1, 3}) {
    data::DataLoader loader(ds, data::LoaderOptions().batch(8).workers(workers, 2).augmentation(aug).with_seed(42));
    loader.set_epoch(3);
    runs.emplace_back();
    for (data::Batch& b : loader) runs.back().push_back(b);
  }
  REQUIRE(runs[0].size() == 7);
  for (size_t r = 1; r < runs.size(); ++r)
    for (size_t k = 0; k < runs[0].size(); ++k) {
      INFO("run " << r << " batch " << k);
      REQUIRE(runs[r][k].indices == runs[0][k].indices);
      REQUIRE(runs[r][k].images.to_vector() == runs[0][k].images.to_vector());
      REQUIRE(runs[r][k].labels.to_vector() == runs[0][k].labels.to_vector());
      REQUIRE(runs[r][k].soft_targets.to_vector() == runs[0][k].soft_targets.to_vector());
    }
  const data::Batch& b = runs[0][0];
  REQUIRE(b.soft_targets.shape() == dg::Shape{8, 4});
  for (int64_t i = 0; i < 8; ++i) {
    float row = 0;
    for (int64_t k = 0; k < 4; ++k) row += b.soft_targets.at({i, k});
    REQUIRE(row == Approx(1.0f).epsilon(1e-6));
  }
}

TEST_CASE("loader: order depends on seed and epoch only, passes advance the epoch by themselves") {
  data::Dataset ds = small_synthetic(40);
  data::DataLoader a(ds, data::LoaderOptions().batch(7).with_seed(1).workers(2));
  data::DataLoader b(ds, data::LoaderOptions().batch(7).with_seed(1));
  a.set_epoch(0);
  const auto e0 = all_indices(a);
  a.set_epoch(1);
  const auto e1 = all_indices(a);
  REQUIRE(e0 != e1);
  b.set_epoch(1);
  REQUIRE(all_indices(b) == e1);
  a.set_epoch(0);
  REQUIRE(all_indices(a) == e0);
  REQUIRE(all_indices(a) == e1);  // no set_epoch: the second pass is epoch 1
  REQUIRE(a.epoch() == 2);
  data::DataLoader c(ds, data::LoaderOptions().batch(7).with_seed(2));
  c.set_epoch(0);
  REQUIRE(all_indices(c) != e0);
}

TEST_CASE("loader: destroyed mid-epoch or restarted mid-epoch without hanging") {
  data::Dataset ds = small_synthetic(500);
  auto aug = data::AugmentOptions().crop(1).flip().mixup(0.8);
  const auto t0 = std::chrono::steady_clock::now();
  for (int round = 0; round < 5; ++round) {
    data::DataLoader loader(ds, data::LoaderOptions().batch(4).workers(3, 4).augmentation(aug));
    int taken = 0;
    for (data::Batch& b : loader) {
      REQUIRE(b.size() == 4);
      if (++taken == 2) break;
    }
    // a new pass stops the old one and starts from batch 0
    auto it = loader.begin();
    REQUIRE(it->size() == 4);
    ++it;
    REQUIRE(it != loader.end());
  }  // destroyed with workers blocked on a full queue
  REQUIRE(std::chrono::steady_clock::now() - t0 < std::chrono::seconds(10));
}

TEST_CASE("loader: an exception in a worker reaches the consumer") {
  data::Dataset ds = small_synthetic(60);
  for (int workers : {0, 1, 3}) {
    INFO(workers << " workers");
    std::atomic<int> calls{0}, bad_shapes{0};  // Catch's REQUIRE is not thread-safe: count, check later
    auto opt = data::LoaderOptions().batch(5).workers(workers).shuffled(false);
    opt.transform = [&](Tensor<float>& img, int64_t index, dg::Generator&) {
      bad_shapes += img.shape() != dg::Shape{2, 6, 5};
      ++calls;
      if (index == 33) DG_THROW("transform: sample ", index, " is cursed");
    };
    data::DataLoader loader(ds, opt);
    int64_t got = 0;
    REQUIRE_THROWS_WITH(
        [&] {
          for (data::Batch& b : loader) got += b.size();
        }(),
        Catch::Contains("sample 33 is cursed"));
    REQUIRE(got == 30);  // batches 0..5 arrived; batch 6 holds sample 33
    REQUIRE(calls > 0);
    REQUIRE(bad_shapes == 0);
    REQUIRE_THROWS_WITH(all_indices(loader), Catch::Contains("sample 33 is cursed"));  // a new pass fails again
  }
}

TEST_CASE("loader: rank shards are disjoint and padded like DistributedSampler") {
  for (int64_t n : {12, 10}) {
    data::Dataset ds = small_synthetic(n);
    const int64_t world = 3, per_rank = (n + world - 1) / world;
    std::vector<int64_t> all;
    for (int64_t rank = 0; rank < world; ++rank) {
      data::DataLoader loader(ds, data::LoaderOptions().batch(3).shard(rank, world).with_seed(5).workers(rank));
      loader.set_epoch(2);
      REQUIRE(loader.num_samples() == per_rank);
      auto idx = all_indices(loader);
      REQUIRE(int64_t(idx.size()) == per_rank);
      all.insert(all.end(), idx.begin(), idx.end());
    }
    std::multiset<int64_t> counts(all.begin(), all.end());
    for (int64_t i = 0; i < n; ++i) REQUIRE(counts.count(i) >= 1);
    REQUIRE(int64_t(all.size()) == per_rank * world);
    if (n % world == 0) {
      REQUIRE(std::set<int64_t>(all.begin(), all.end()).size() == all.size());  // disjoint
    } else {
      // padding repeats the start of the epoch's permutation: rank r's last index is perm[(r + 3*3) % n]
      data::DataLoader whole(ds, data::LoaderOptions().batch(100).with_seed(5));
      whole.set_epoch(2);
      auto perm = all_indices(whole);
      REQUIRE(counts.count(perm[0]) == 2);
      REQUIRE(counts.count(perm[1]) == 2);
      REQUIRE(counts.count(perm[2]) == 1);
    }
  }
  data::Dataset ds = small_synthetic(10);
  REQUIRE_THROWS_WITH(data::DataLoader(ds, data::LoaderOptions().shard(3, 3)),
                      Catch::Contains("expected 0 <= rank < world_size, got rank 3 and world_size 3"));
}

TEST_CASE("loader: uint8 images are scaled to [0, 1] and normalized, option errors") {
  auto ds = data::Dataset::from_uint8({0, 51, 102, 255}, {1, 1, 2, 2}, {1}, 2, "tiny");
  data::DataLoader loader(ds, data::LoaderOptions().batch(4).augmentation(data::AugmentOptions().normalize({0.2f}, {0.5f})));
  data::Batch b = *loader.begin();
  REQUIRE(b.images.shape() == dg::Shape{1, 1, 2, 2});
  const std::vector<float> expect = {(0.0f - 0.2f) / 0.5f, (51 / 255.0f - 0.2f) / 0.5f, (102 / 255.0f - 0.2f) / 0.5f,
                                     (1.0f - 0.2f) / 0.5f};
  REQUIRE(b.images.to_vector() == expect);
  REQUIRE(b.labels.to_vector() == std::vector<int64_t>{1});
  REQUIRE_THROWS_WITH(data::DataLoader(ds, data::LoaderOptions().batch(0)), Catch::Contains("batch_size must be positive"));
  REQUIRE_THROWS_WITH(data::DataLoader(ds, data::LoaderOptions().augmentation(data::AugmentOptions().normalize({0, 0}, {1, 1}))),
                      Catch::Contains("one mean and one std per channel (1), got 2 means"));
  REQUIRE_THROWS_WITH(data::DataLoader(ds, data::LoaderOptions().workers(-1)), Catch::Contains("num_workers >= 0"));
}

}  // namespace test_data

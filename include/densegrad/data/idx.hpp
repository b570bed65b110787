// densegrad/data/idx.hpp: the IDX format of MNIST and Fashion-MNIST (unsigned-byte images and
// labels), plain or gzip-compressed, read through zlib; consumers must link zlib (ZLIB::ZLIB).
// Not a general IDX reader: only the ubyte type (0x08) with 3-D images and 1-D labels.
#pragma once

#include <zlib.h>

#include <array>
#include <cerrno>
#include <climits>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <string>
#include <vector>

#include "dataset.hpp"

namespace dg::data {

namespace detail {

/// Reads a plain or gzip file through zlib (gzread passes a file without a gzip header through
/// unchanged). Sizes are checked before memory is allocated: against the file size for a plain file;
/// for a gzip file, whose header dims cannot be checked up front, data is read in chunks and the
/// buffer grows only as decompressed bytes actually arrive.
class FileReader {
 public:
  // Deflate never compresses better than 1032:1, so a gzip file of S bytes holds at most ~1032*S.
  static constexpr uint64_t kMaxDeflateRatio = 1032;

  FileReader(const std::string& path, const char* format) : path_(path), format_(format) {
    std::error_code ec;
    DG_CHECK(std::filesystem::is_regular_file(path, ec), format, ": cannot read '", path, "': no such file");
    file_size_ = std::filesystem::file_size(path, ec);
    DG_CHECK(!ec, format, ": cannot read '", path, "': ", ec.message());
    f_ = gzopen(path.c_str(), "rb");
    DG_CHECK(f_ != nullptr, format, ": cannot open '", path, "': ", std::strerror(errno));
    gzbuffer(f_, 1 << 17);
    compressed_ = gzdirect(f_) == 0;
  }
  ~FileReader() { gzclose(f_); }
  FileReader(const FileReader&) = delete;
  FileReader& operator=(const FileReader&) = delete;

  const std::string& path() const { return path_; }
  bool compressed() const { return compressed_; }
  uint64_t file_size() const { return file_size_; }
  uint64_t position() const { return pos_; }  // decompressed bytes read so far
  /// Most (decompressed) bytes the file can still hold: exact for a plain file, a bound for gzip.
  uint64_t max_remaining() const {
    if (!compressed_) return file_size_ - pos_;
    return file_size_ > UINT64_MAX / kMaxDeflateRatio ? UINT64_MAX : file_size_ * kMaxDeflateRatio;
  }

  /// Up to n bytes into dst; fewer only at the end of the file. Throws on a zlib error.
  size_t read_some(void* dst, size_t n) {
    size_t got = 0;
    while (got < n) {
      unsigned chunk = static_cast<unsigned>(std::min<size_t>(n - got, 1u << 20));
      int r = gzread(f_, static_cast<char*>(dst) + got, chunk);
      int errnum = Z_OK;
      const char* msg = gzerror(f_, &errnum);
      DG_CHECK(r >= 0 && (errnum == Z_OK || errnum == Z_STREAM_END), format_, ": '", path_, "' is ",
               compressed_ ? "a truncated or corrupt gzip file" : "unreadable", " (zlib: ", msg,
               "), reading at decompressed offset ", pos_ + got);
      if (r == 0) break;
      got += static_cast<size_t>(r);
    }
    pos_ += got;
    return got;
  }
  /// Exactly n bytes, or an error saying which part of the file was cut short.
  void read_exact(void* dst, size_t n, const char* what) {
    uint64_t at = pos_;
    size_t got = read_some(dst, n);
    DG_CHECK(got == n, format_, ": '", path_, "' is truncated: expected ", n, " bytes of ", what, " at offset ", at,
             ", found ", got, (compressed_ ? " (after decompression)" : ""));
  }
  /// Exactly n bytes as a vector. For gzip the vector grows chunk by chunk as data arrives, so a
  /// header that claims huge dims fails on missing data, not on a huge allocation.
  std::vector<uint8_t> read_vector(uint64_t n, const char* what) {
    DG_CHECK(n <= max_remaining(), format_, ": '", path_, "': header promises ", n, " bytes of ", what,
             ", but the file ", (compressed_ ? "(gzip, " + std::to_string(file_size_) + " bytes) can hold at most "
                                             : "has only "),
             max_remaining(), " more");
    std::vector<uint8_t> v;
    if (!compressed_) {
      v.resize(static_cast<size_t>(n));
      read_exact(v.data(), v.size(), what);
      return v;
    }
    const uint64_t at = pos_;
    while (v.size() < n) {
      size_t old = v.size(), chunk = static_cast<size_t>(std::min<uint64_t>(n - old, 1u << 22));
      v.resize(old + chunk);
      size_t got = read_some(v.data() + old, chunk);
      DG_CHECK(got == chunk, format_, ": '", path_, "' is truncated: expected ", n, " bytes of ", what, " at offset ",
               at, ", found ", old + got, " (after decompression)");
    }
    return v;
  }
  /// Everything up to the end of the file; more than `cap` bytes is an error.
  std::vector<uint8_t> read_to_end(uint64_t cap, const char* what) {
    std::vector<uint8_t> v;
    for (;;) {
      DG_CHECK(v.size() <= cap, format_, ": '", path_, "' holds more than ", cap, " bytes, the most ", what, " can be");
      size_t old = v.size(), chunk = 1u << 22;
      if (!compressed_) chunk = static_cast<size_t>(std::min<uint64_t>(chunk, max_remaining()) + 1);
      v.resize(old + chunk);
      size_t got = read_some(v.data() + old, chunk);
      v.resize(old + got);
      if (got < chunk) return v;
    }
  }
  /// Throws if anything follows the expected data.
  void expect_end(const char* what) {
    uint64_t at = pos_;
    char c;
    size_t extra = read_some(&c, 1);
    DG_CHECK(extra == 0, format_, ": '", path_, "' has trailing bytes after the ", what, " (expected ", at,
             " bytes", (compressed_ ? " after decompression" : ""), ", file has more",
             (compressed_ ? "" : ": " + std::to_string(file_size_)), ")");
  }

 private:
  std::string path_;
  const char* format_;
  gzFile f_ = nullptr;
  uint64_t file_size_ = 0, pos_ = 0;
  bool compressed_ = false;
};

inline uint32_t read_be32(FileReader& r, const char* what) {
  uint8_t b[4];
  r.read_exact(b, 4, what);
  return (uint32_t(b[0]) << 24) | (uint32_t(b[1]) << 16) | (uint32_t(b[2]) << 8) | uint32_t(b[3]);
}

inline std::string hex32(uint32_t v) {
  const char* digits = "0123456789abcdef";
  std::string s = "0x";
  for (int i = 28; i >= 0; i -= 4) s += digits[(v >> i) & 15];
  return s;
}

}  // namespace detail

/// The contents of one IDX file: dims from the header and the unsigned bytes, C order.
struct IdxData {
  Shape dims;
  std::vector<uint8_t> bytes;
};

/// Reads an IDX ubyte file with `ndim` dims (magic 0x00000800 + ndim), plain or gzip.
/// Checks the magic, that every dim is positive (the first may be 0), that the product fits,
/// that the file holds exactly that many bytes, and nothing after them.
inline IdxData read_idx(const std::string& path, int ndim) {
  DG_CHECK(ndim >= 1 && ndim <= 4, "idx: ndim must be in [1, 4], got ", ndim);
  detail::FileReader r(path, "idx");
  const uint32_t expected = 0x00000800u + static_cast<uint32_t>(ndim);
  const uint32_t magic = detail::read_be32(r, "header (magic number)");
  const char* kind = ndim == 3 ? " (IDX images: ubyte, 3 dims)" : ndim == 1 ? " (IDX labels: ubyte, 1 dim)" : "";
  DG_CHECK(magic == expected, "idx: '", path, "': expected magic ", detail::hex32(expected), kind, ", found ",
           detail::hex32(magic),
           (magic >> 8) == 0x08u && (magic & 0xff) != static_cast<uint32_t>(ndim)
               ? " (an IDX ubyte file with " + std::to_string(magic & 0xff) + " dims)"
           : (magic >> 16) == 0 ? " (an IDX file of a type other than ubyte, or another format)"
                                : " (not an IDX file)");
  IdxData d;
  uint64_t numel = 1;
  for (int i = 0; i < ndim; ++i) {
    const uint32_t n = detail::read_be32(r, "header (dims)");
    DG_CHECK(n > 0 || i == 0, "idx: '", path, "': dim ", i, " is 0, expected a positive size");
    d.dims.push_back(static_cast<int64_t>(n));
    DG_CHECK(n == 0 || numel <= UINT64_MAX / n, "idx: '", path, "': dims ", shape_str(d.dims),
             " overflow 64 bits");
    numel *= n;
  }
  const uint64_t header = 4 + 4 * static_cast<uint64_t>(ndim);
  // the header was read, so file_size >= header: compare without forming header + numel (may overflow)
  DG_CHECK(r.compressed() || r.file_size() - header == numel, "idx: '", path, "': dims ", shape_str(d.dims),
           " need ", header, " header bytes + ", numel, " data bytes, but the file has ", r.file_size(), " bytes",
           r.file_size() - header < numel ? " (truncated?)" : " (trailing bytes?)");
  d.bytes = r.read_vector(numel, "data");
  r.expect_end("data");
  return d;
}

/// Images of an IDX file (magic 0x00000803): dims (N, H, W).
inline IdxData read_idx_images(const std::string& path) { return read_idx(path, 3); }
/// Labels of an IDX file (magic 0x00000801): dims (N).
inline IdxData read_idx_labels(const std::string& path) { return read_idx(path, 1); }

/// An image file and its label file as a Dataset of (N, 1, H, W) uint8 images; every label must
/// be below num_classes. Like torchvision.datasets.MNIST given the raw files.
inline Dataset load_idx(const std::string& images_path, const std::string& labels_path, int64_t num_classes = 10) {
  IdxData im = read_idx_images(images_path);
  IdxData lb = read_idx_labels(labels_path);
  DG_CHECK(im.dims[0] == lb.dims[0], "idx: '", images_path, "' has ", im.dims[0], " images but '", labels_path,
           "' has ", lb.dims[0], " labels; expected the same count");
  for (size_t i = 0; i < lb.bytes.size(); ++i)
    DG_CHECK(lb.bytes[i] < num_classes, "idx: '", labels_path, "': label ", i, " is ", int(lb.bytes[i]),
             ", expected < ", num_classes, " (num_classes)");
  std::vector<int64_t> labels(lb.bytes.begin(), lb.bytes.end());
  return Dataset::from_uint8(std::move(im.bytes), {im.dims[0], 1, im.dims[1], im.dims[2]}, std::move(labels),
                             num_classes, images_path);
}

namespace detail {

// The first existing file among dir/<name>[.gz] for each name, in dir and in torchvision's
// <dir>/<Folder>/raw layout; "" when none exists.
inline std::string find_first(const std::vector<std::string>& dirs, const std::vector<std::string>& names,
                              std::string& tried) {
  for (const auto& d : dirs)
    for (const auto& n : names)
      for (const char* ext : {"", ".gz"}) {
        std::string p = d + "/" + n + ext;
        std::error_code ec;
        if (std::filesystem::is_regular_file(p, ec)) return p;
        tried += (tried.empty() ? "" : ", ") + p;
      }
  return "";
}

// Shared by the MNIST-style loaders: the file names are the same, the hints differ.
inline Dataset load_mnist_style(const std::string& dir, bool train, const char* what, const char* folder,
                                const char* hint) {
  std::error_code ec;
  DG_CHECK(std::filesystem::is_directory(dir, ec), what, ": directory '", dir, "' not found. ", hint);
  const std::vector<std::string> dirs = {dir, dir + "/" + folder + "/raw", dir + "/raw"};
  const std::string split = train ? "train" : "t10k";
  std::string tried_images, tried_labels;
  std::string images = find_first(dirs, {split + "-images-idx3-ubyte", split + "-images.idx3-ubyte"}, tried_images);
  std::string labels = find_first(dirs, {split + "-labels-idx1-ubyte", split + "-labels.idx1-ubyte"}, tried_labels);
  DG_CHECK(!images.empty(), what, ": no ", split, " images in '", dir, "' (tried ", tried_images, "). ", hint);
  DG_CHECK(!labels.empty(), what, ": no ", split, " labels in '", dir, "' (tried ", tried_labels, "). ", hint);
  return load_idx(images, labels, 10);
}

}  // namespace detail

/// Where load_fashion_mnist looks by default: $DENSEGRAD_FASHION_MNIST_DIR, else the directory
/// CMake configured (DENSEGRAD_FASHION_MNIST_DIR), else Debian's /usr/share/datasets/fashion-mnist.
inline std::string default_fashion_mnist_dir() {
  if (const char* e = std::getenv("DENSEGRAD_FASHION_MNIST_DIR"); e && *e) return e;
#ifdef DENSEGRAD_FASHION_MNIST_DIR
  if (std::string(DENSEGRAD_FASHION_MNIST_DIR).size()) return DENSEGRAD_FASHION_MNIST_DIR;
#endif
  return "/usr/share/datasets/fashion-mnist";
}

/// Fashion-MNIST (torchvision.datasets.FashionMNIST): 60000 train or 10000 test images of
/// (1, 28, 28) uint8, 10 classes. Finds {train,t10k}-{images-idx3,labels-idx1}-ubyte, plain or .gz,
/// in dir (Debian's dataset-fashion-mnist layout) or dir/FashionMNIST/raw (torchvision's).
///   auto train = dg::data::load_fashion_mnist(dg::data::default_fashion_mnist_dir(), true);
inline Dataset load_fashion_mnist(const std::string& dir = default_fashion_mnist_dir(), bool train = true) {
  return detail::load_mnist_style(
      dir, train, "load_fashion_mnist", "FashionMNIST",
      "Install it with `apt-get install dataset-fashion-mnist` (files land in /usr/share/datasets/fashion-mnist), "
      "or download the four *-ubyte.gz files from https://github.com/zalandoresearch/fashion-mnist into that directory");
}

/// MNIST digits (torchvision.datasets.MNIST); same file names and layouts as load_fashion_mnist.
inline Dataset load_mnist(const std::string& dir, bool train = true) {
  return detail::load_mnist_style(
      dir, train, "load_mnist", "MNIST",
      "Download the four *-ubyte.gz files (e.g. from https://ossci-datasets.s3.amazonaws.com/mnist/) into that directory");
}

/// Fashion-MNIST class names, by label.
inline const std::array<const char*, 10>& fashion_mnist_classes() {
  static const std::array<const char*, 10> names = {"T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                                                    "Sandal",      "Shirt",   "Sneaker",  "Bag",   "Ankle boot"};
  return names;
}

}  // namespace dg::data

// tests/fuzz/fuzz_util.hpp: what the libFuzzer targets share: the rule that a parser may reject an
// input only with dg::Error, in-memory files for parsers that take a path, and gzip compression.
// Not a test framework: a target aborts (a libFuzzer finding) the moment a rule is broken.
#pragma once

#include <sys/mman.h>  // memfd_create
#include <unistd.h>
#include <zlib.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include <densegrad/core/error.hpp>

namespace fuzz {

/// Runs f. dg::Error is how a parser rejects a bad input, so it is expected and swallowed;
/// any other exception leaves LLVMFuzzerTestOneInput, which terminates: libFuzzer reports it.
template <class F>
void accept_or_reject(F&& f) {
  try {
    f();
  } catch (const dg::Error&) {
  }
}

/// Aborts naming a property that every accepted input must have (a libFuzzer finding).
[[noreturn]] inline void fail(const char* what) {
  std::fprintf(stderr, "fuzz: property violated: %s\n", what);
  std::abort();
}
inline void check(bool ok, const char* what) {
  if (!ok) fail(what);
}

/// A file in memory (memfd_create), reachable by path as /proc/self/fd/N, rewritten per input:
/// parsers that only take a path read it like any file, without touching the disk.
class MemFile {
 public:
  explicit MemFile(const char* name) : fd_(memfd_create(name, 0)) {
    if (fd_ < 0) fail("memfd_create failed (Linux >= 3.17 needed)");
    path_ = "/proc/self/fd/" + std::to_string(fd_);
  }
  MemFile(const MemFile&) = delete;
  MemFile& operator=(const MemFile&) = delete;
  ~MemFile() { close(fd_); }

  /// Replaces the contents with bytes[0, n) and returns the path to open.
  const std::string& write(const uint8_t* bytes, size_t n) {
    if (ftruncate(fd_, 0) != 0) fail("ftruncate of the memfd failed");
    for (size_t done = 0; done < n;) {
      ssize_t w = pwrite(fd_, bytes + done, n - done, static_cast<off_t>(done));
      if (w <= 0) fail("write to the memfd failed");
      done += static_cast<size_t>(w);
    }
    return path_;
  }

 private:
  int fd_;
  std::string path_;
};

/// bytes[0, n) as a gzip file (what `gzip -c` writes), so a target can hand a parser
/// well-formed compressed data whose contents the fuzzer chose.
inline std::vector<uint8_t> gzip(const uint8_t* bytes, size_t n) {
  z_stream z{};
  if (deflateInit2(&z, Z_BEST_SPEED, Z_DEFLATED, 15 + 16, 8, Z_DEFAULT_STRATEGY) != Z_OK) fail("deflateInit2 failed");
  std::vector<uint8_t> out(deflateBound(&z, static_cast<uLong>(n)) + 32);
  z.next_in = const_cast<Bytef*>(bytes);
  z.avail_in = static_cast<uInt>(n);
  z.next_out = out.data();
  z.avail_out = static_cast<uInt>(out.size());
  if (deflate(&z, Z_FINISH) != Z_STREAM_END) fail("deflate did not finish");
  out.resize(z.total_out);
  deflateEnd(&z);
  return out;
}

}  // namespace fuzz

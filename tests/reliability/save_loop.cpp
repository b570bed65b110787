// tests/reliability/save_loop.cpp: rewrites one multi-MB checkpoint over and over with
// io::write_safetensors (temp file, fsync, rename), each version self-describing; and checks a file.
// kill_during_save.sh SIGKILLs the writer at random moments and checks the file after each kill.
//   save_loop write PATH [MB=8] [COUNT=0]   versions last+1, last+2, ... (COUNT 0: until killed)
//   save_loop check PATH [MIN_VERSION=1]    prints "version V" and exits 0 when PATH holds one
//                                           complete version V >= MIN_VERSION; else exits 1
// Not a benchmark: the point is which bytes are at PATH when the process dies.
#include <densegrad/io/safetensors.hpp>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <string>

namespace {

using dg::io::RawTensor;

// splitmix64: the value of element i of version v, reproducible by the checker.
uint64_t mix(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

// FNV-1a over bytes, as the checksum tensor stores it.
uint64_t fnv1a(const std::vector<uint8_t>& bytes, uint64_t h = 0xcbf29ce484222325ull) {
  for (uint8_t b : bytes) h = (h ^ b) * 0x100000001b3ull;
  return h;
}

// Version v: "data" (F32, MB megabytes of values from (v, i)), "index" (I64), "version" and
// "checksum" (FNV-1a of data then index). A torn or mixed file fails one of the checks below.
std::map<std::string, RawTensor> version_tensors(int64_t v, int64_t mb) {
  const int64_t n = mb * (1 << 20) / 4;
  std::map<std::string, RawTensor> t;
  RawTensor& data = t["data"];  // filled in place: the bytes of n little-endian floats
  data.dtype = dg::DType::Float32;
  data.shape = {n};
  data.data.resize(static_cast<size_t>(n) * 4);
  for (int64_t i = 0; i < n; ++i) {  // 24-bit integers: exact in float
    const float x = static_cast<float>(mix(static_cast<uint64_t>(v) << 32 | static_cast<uint64_t>(i)) >> 40);
    uint32_t bits;
    std::memcpy(&bits, &x, 4);
    dg::io::detail::store_le(data.data.data() + 4 * i, bits, 4);
  }
  std::vector<int64_t> index(64);
  for (size_t i = 0; i < index.size(); ++i) index[i] = v * 1000 + static_cast<int64_t>(i);
  t["index"] = RawTensor::from_vector<int64_t>({static_cast<int64_t>(index.size())}, index);
  t["version"] = RawTensor::from_vector<int64_t>({}, {v});
  t["checksum"] = RawTensor::from_vector<int64_t>({}, {static_cast<int64_t>(fnv1a(t["index"].data, fnv1a(t["data"].data)))});
  return t;
}

// The version in the file at path, after checking that it is complete; throws dg::Error otherwise.
int64_t check_file(const std::string& path) {
  const dg::io::Safetensors st = dg::io::read_safetensors(path);  // sizes, offsets, header: all checked
  auto at = [&](const char* name) -> const RawTensor& {
    auto it = st.tensors.find(name);
    DG_CHECK(it != st.tensors.end(), "save_loop: '", path, "' has no tensor '", name, "'");
    return it->second;
  };
  const int64_t v = at("version").to_vector<int64_t>().at(0);
  const int64_t stored = at("checksum").to_vector<int64_t>().at(0);
  const uint64_t sum = fnv1a(at("index").data, fnv1a(at("data").data));
  DG_CHECK(static_cast<int64_t>(sum) == stored, "save_loop: '", path, "' version ", v, ": checksum mismatch");
  DG_CHECK(st.metadata.count("version") && st.metadata.at("version") == std::to_string(v), "save_loop: '", path,
           "': metadata says version ", (st.metadata.count("version") ? st.metadata.at("version") : "(none)"),
           ", tensors say ", v);
  const int64_t mb = static_cast<int64_t>(at("data").data.size() >> 20);
  const auto expected = version_tensors(v, mb);
  for (const auto& [name, t] : expected)
    DG_CHECK(at(name.c_str()).data == t.data, "save_loop: '", path, "' version ", v, ": tensor '", name,
             "' is not what version ", v, " wrote");
  return v;
}

}  // namespace

int main(int argc, char** argv) {
  const std::string mode = argc >= 3 ? argv[1] : "";
  if (mode != "write" && mode != "check") {
    std::fprintf(stderr, "usage: save_loop write PATH [MB=8] [COUNT=0]\n       save_loop check PATH [MIN_VERSION=1]\n");
    return 2;
  }
  const std::string path = argv[2];
  try {
    if (mode == "check") {
      const int64_t min_version = argc >= 4 ? std::atoll(argv[3]) : 1;
      const int64_t v = check_file(path);
      DG_CHECK(v >= min_version, "save_loop: '", path, "' holds version ", v, ", older than version ", min_version,
               " which was already complete");
      std::printf("version %lld\n", static_cast<long long>(v));
      return 0;
    }
    const int64_t mb = argc >= 4 ? std::atoll(argv[3]) : 8, count = argc >= 5 ? std::atoll(argv[4]) : 0;
    DG_CHECK(mb >= 1, "save_loop: MB must be >= 1, got ", mb);
    std::error_code ec;
    int64_t v = 0;  // go on from the version in the file (checked by kill_during_save.sh, not here)
    if (std::filesystem::exists(path, ec)) {
      const dg::io::Safetensors st = dg::io::read_safetensors(path);
      auto it = st.tensors.find("version");
      DG_CHECK(it != st.tensors.end(), "save_loop: '", path, "' has no tensor 'version'");
      v = it->second.to_vector<int64_t>().at(0);
    }
    for (int64_t k = 0; count == 0 || k < count; ++k) {
      ++v;
      dg::io::write_safetensors(path, version_tensors(v, mb), {{"version", std::to_string(v)}});
      std::printf("saved version %lld\n", static_cast<long long>(v));
      std::fflush(stdout);
    }
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "%s\n", e.what());
    return 1;
  }
}

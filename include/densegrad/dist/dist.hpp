// densegrad/dist/dist.hpp: data-parallel training over MPI (dg::dist): the process group that
// mpirun started, broadcast of the initial weights, gradient averaging in buckets during
// backward() (reducer.hpp, over MpiCollective here), data shards, rank-0 output, and ending the
// whole job when one rank fails. The one densegrad header that includes <mpi.h>: only programs
// linking MPI (CMake target densegrad::dist) include it. Not an RPC layer: collectives only.
//   int main(int argc, char** argv) {
//     dg::dist::Environment mpi(argc, argv);     // MPI when started by mpirun, else a world of one
//     return mpi.exit(train(argc, argv));        // 0: MPI_Finalize; else MPI_Abort ends every rank
//   }
#pragma once

#include <mpi.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <limits>
#include <string>
#include <vector>

#include "../densegrad.hpp"
#include "reducer.hpp"

namespace dg::dist {

namespace detail {
/// The process group: set by init(), a world of one until then (or without a launcher).
struct State {
  bool active = false;           // MPI is in use (comm is valid)
  bool we_initialized = false;   // init() called MPI_Init_thread, so finalize() ends MPI
  int rank = 0, size = 1, local_rank = 0, local_size = 1;
  MPI_Comm comm = MPI_COMM_NULL;  // a duplicate of MPI_COMM_WORLD: our collectives never mix with the program's
};
inline State& state() {
  static State s;
  return s;
}

/// Throws dg::Error naming the MPI call and MPI's error string (our communicator returns errors).
inline void check_mpi(int rc, const char* call) {
  if (rc == MPI_SUCCESS) return;
  char text[MPI_MAX_ERROR_STRING];
  int len = 0;
  MPI_Error_string(rc, text, &len);
  DG_THROW("dist: ", call, " failed: ", std::string(text, static_cast<size_t>(len)));
}

/// MPI_Bcast of n bytes from root, 1 GiB per call (MPI counts are int).
inline void broadcast_bytes(char* p, size_t n, int root, MPI_Comm comm) {
  for (size_t done = 0; done < n;) {
    const int chunk = static_cast<int>(std::min<size_t>(n - done, size_t(1) << 30));
    check_mpi(MPI_Bcast(p + done, chunk, MPI_BYTE, root, comm), "MPI_Bcast");
    done += static_cast<size_t>(chunk);
  }
}

/// MPI's datatype for a bucket's element type.
inline MPI_Datatype mpi_type(DType t) {
  switch (t) {
    case DType::Float32: return MPI_FLOAT;
    case DType::Float64: return MPI_DOUBLE;
    case DType::Int64: return MPI_INT64_T;
    default: DG_THROW("dist: no MPI sum for dtype ", dtype_name(t), " (reduce in float or double)");
  }
}
}  // namespace detail

/// True when an MPI launcher (mpirun/mpiexec of Open MPI or MPICH, srun with PMI/PMIx) started
/// this process: its environment then names a rank.
inline bool launched_by_mpi() {
  for (const char* v : {"OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMI_RANK", "PMIX_RANK", "MPI_LOCALNRANKS"})
    if (std::getenv(v)) return true;
  return false;
}

/// Joins the MPI job this process belongs to (torch.distributed.init_process_group from the
/// environment): MPI_Init_thread when launched by mpirun (or when the program initialized MPI
/// itself), else nothing: a world of one, no MPI calls at all. Idempotent. MPI is called only
/// from one thread at a time (MPI_THREAD_SERIALIZED): the thread that runs backward().
inline void init(int* argc = nullptr, char*** argv = nullptr) {
  detail::State& s = detail::state();
  if (s.active) return;
  int initialized = 0;
  MPI_Initialized(&initialized);
  if (!initialized) {
    if (!launched_by_mpi()) return;
    int provided = 0;
    detail::check_mpi(MPI_Init_thread(argc, argv, MPI_THREAD_SERIALIZED, &provided), "MPI_Init_thread");
    DG_CHECK(provided >= MPI_THREAD_FUNNELED, "dist: this MPI provides no thread support (level ", provided,
             "); OpenMP and the data loader threads need MPI_THREAD_FUNNELED");
    s.we_initialized = true;
  }
  detail::check_mpi(MPI_Comm_dup(MPI_COMM_WORLD, &s.comm), "MPI_Comm_dup");
  MPI_Comm_set_errhandler(s.comm, MPI_ERRORS_RETURN);  // errors become dg::Error naming the call
  MPI_Comm_rank(s.comm, &s.rank);
  MPI_Comm_size(s.comm, &s.size);
  MPI_Comm local;  // the ranks sharing this host: local_rank picks a GPU
  detail::check_mpi(MPI_Comm_split_type(s.comm, MPI_COMM_TYPE_SHARED, s.rank, MPI_INFO_NULL, &local),
                    "MPI_Comm_split_type");
  MPI_Comm_rank(local, &s.local_rank);
  MPI_Comm_size(local, &s.local_size);
  MPI_Comm_free(&local);
  s.active = true;
}

/// Leaves MPI cleanly (MPI_Finalize, if init() started it). Every rank must get here: a rank
/// that failed alone calls abort() instead, or the others would wait for it forever.
inline void finalize() {
  detail::State& s = detail::state();
  if (!s.active) return;
  MPI_Comm_free(&s.comm);
  if (s.we_initialized) MPI_Finalize();
  s = detail::State{};
}

/// This process's rank, 0 .. world_size() - 1 (0 without MPI).
inline int rank() { return detail::state().rank; }
/// The number of processes in the job (1 without MPI).
inline int world_size() { return detail::state().size; }
/// This process's rank among those on its host (picks the GPU), and their number.
inline int local_rank() { return detail::state().local_rank; }
inline int local_size() { return detail::state().local_size; }
/// True on rank 0, the rank that prints, logs and writes checkpoints.
inline bool is_main() { return rank() == 0; }
/// The communicator of the job (a duplicate of MPI_COMM_WORLD); MPI_COMM_NULL without MPI.
inline MPI_Comm comm() { return detail::state().comm; }
/// "rank R of W: " for messages, or "" in a world of one.
inline std::string rank_tag() {
  return world_size() > 1 ? "rank " + std::to_string(rank()) + " of " + std::to_string(world_size()) + ": " : "";
}

/// Writes `line` to stderr and ends every rank of the job now (MPI_Abort), so no rank is left
/// waiting in a collective for this one. Without MPI, exits the process with `code`.
[[noreturn]] inline void abort(const std::string& line, int code = 1) {
  std::fflush(stdout);
  if (!line.empty()) std::fprintf(stderr, "%s\n", line.c_str());
  std::fflush(stderr);
  if (detail::state().active) MPI_Abort(MPI_COMM_WORLD, code);
  std::_Exit(code);
}

/// Points stdout at /dev/null on every rank but 0, so progress and results are printed once.
/// stderr stays: an error names the rank it happened on.
inline void quiet_stdout_unless_main() {
  if (!is_main()) DG_CHECK(std::freopen("/dev/null", "w", stdout) != nullptr, "dist: cannot redirect stdout");
}

/// Waits until every rank got here (MPI_Barrier).
inline void barrier() {
  if (detail::state().active) detail::check_mpi(MPI_Barrier(comm()), "MPI_Barrier");
}

/// v[i] = the sum of v[i] over all ranks, blocking (MPI_Allreduce); for metrics and counts.
inline void all_reduce_sum(double* v, int n) {
  if (world_size() > 1) detail::check_mpi(MPI_Allreduce(MPI_IN_PLACE, v, n, MPI_DOUBLE, MPI_SUM, comm()), "MPI_Allreduce");
}
/// True on every rank when `b` is true on every rank.
inline bool all_true(bool b) {
  int v = b ? 1 : 0;
  if (world_size() > 1) detail::check_mpi(MPI_Allreduce(MPI_IN_PLACE, &v, 1, MPI_INT, MPI_MIN, comm()), "MPI_Allreduce");
  return v != 0;
}

/// Throws dg::Error on every rank unless every rank passes the same value: the ranks of one
/// job must agree on what decides the collectives' order (batches per epoch, model layout).
inline void check_uniform(int64_t value, const std::string& what) {
  if (world_size() == 1) return;
  int64_t lo = value, hi = value;
  detail::check_mpi(MPI_Allreduce(MPI_IN_PLACE, &lo, 1, MPI_INT64_T, MPI_MIN, comm()), "MPI_Allreduce");
  detail::check_mpi(MPI_Allreduce(MPI_IN_PLACE, &hi, 1, MPI_INT64_T, MPI_MAX, comm()), "MPI_Allreduce");
  DG_CHECK(lo == hi, "dist: ", what, " differs between ranks: ", lo, " to ", hi, " (this rank, ", rank(), ", has ",
           value, "); every rank must run the same program on the same settings and data");
}

namespace detail {
/// broadcast() without the size check (the caller checked the sizes of all its tensors at once).
template <class T>
void broadcast_unchecked(const Tensor<T>& t, int root) {
  Tensor<T> host = t.to(Device::cpu()).contiguous();
  if (host.storage().is_alias_of(t.storage())) host = host.clone();  // a copy we may overwrite
  broadcast_bytes(reinterpret_cast<char*>(host.data()), static_cast<size_t>(host.numel()) * sizeof(T), root, comm());
  NoGradGuard no_grad;  // parameters require grad: the copy is not part of any graph
  Tensor<T>(t).copy_(host);
}
}  // namespace detail

/// Copies root's values of t into t on every rank (MPI_Bcast, byte for byte; through host
/// memory for a CUDA tensor). Every rank passes a tensor of the same size (checked).
template <class T>
void broadcast(const Tensor<T>& t, int root = 0) {
  if (world_size() == 1) return;
  check_uniform(t.numel(), "the size of a broadcast tensor");
  detail::broadcast_unchecked(t, root);
}

/// Makes every rank's parameters and buffers rank root's (torch DDP's broadcast at construction),
/// after checking that all ranks built the same model: same names, shapes and order.
template <class T>
void broadcast_parameters(const nn::Module<T>& model, int root = 0) {
  if (world_size() == 1) return;
  auto named = model.named_parameters();
  for (auto& b : model.named_buffers()) named.push_back(b);
  uint64_t h = 1469598103934665603ull;  // FNV-1a of "name:shape;" for every tensor
  auto mix = [&](const std::string& s) {
    for (unsigned char ch : s) h = (h ^ ch) * 1099511628211ull;
  };
  int64_t numel = 0;
  for (auto& [name, t] : named) {
    mix(name + ":" + shape_str(t.shape()) + ";");
    numel += t.numel();
  }
  check_uniform(static_cast<int64_t>(named.size()), "the number of parameters and buffers");
  check_uniform(numel, "the number of parameter and buffer elements");
  check_uniform(static_cast<int64_t>(h >> 1), "the parameter names and shapes (a hash of them)");
  for (auto& [name, t] : named) detail::broadcast_unchecked(t, root);
}

/// Throws dg::Error on every rank unless all ranks hold the same weights (a checksum of every
/// parameter, compared with a relative tolerance of 1e-6): the guard against ranks drifting
/// apart. `when` says where in training, for the message.
template <class T>
void check_in_sync(const nn::Module<T>& model, const std::string& when) {
  if (world_size() == 1) return;
  double sum = 0, abs_sum = 0;
  for (const Tensor<T>& p : model.parameters())
    for (T v : p.to_vector()) {
      sum += static_cast<double>(acc_t<T>(v));
      abs_sum += std::abs(static_cast<double>(acc_t<T>(v)));
    }
  double v[2] = {sum, -sum};  // max and -min in one call
  detail::check_mpi(MPI_Allreduce(MPI_IN_PLACE, v, 2, MPI_DOUBLE, MPI_MAX, comm()), "MPI_Allreduce");
  const double spread = v[0] + v[1];
  DG_CHECK(!(spread > 1e-6 * (abs_sum + 1)), "dist: the ranks' weights differ ", when, " (checksums spread by ",
           spread, ", this rank's is ", sum, "); a rank skipped or repeated an update");
}

/// options with this rank's shard (torch DistributedSampler): of each epoch's seeded
/// permutation, padded to a multiple of world_size(), rank r takes positions r, r + W, ...
inline data::LoaderOptions sharded(data::LoaderOptions options) {
  return options.shard(rank(), world_size());
}
/// This rank's part of an evaluation set: samples r, r + W, r + 2W, ... (no padding, no
/// repeats; the parts of all ranks are the whole set). The whole set in a world of one.
inline data::Dataset eval_shard(const data::Dataset& set) {
  if (world_size() == 1) return set;
  std::vector<int64_t> idx;
  for (int64_t i = rank(); i < set.size(); i += world_size()) idx.push_back(i);
  return set.subset(idx);
}

/// The Reducer's sums over MPI (MPI_Iallreduce on host buffers, in place).
class MpiCollective final : public Collective {
 public:
  int rank() const override { return dist::rank(); }
  int world_size() const override { return dist::world_size(); }
  Device device() const override { return Device::cpu(); }
  void start_sum(void* data, int64_t count, DType dtype, int slot) override {
    DG_CHECK(count <= std::numeric_limits<int>::max(), "dist: a bucket of ", count,
             " elements is too large for one MPI call; use smaller buckets");
    if (static_cast<size_t>(slot) >= requests_.size()) requests_.resize(static_cast<size_t>(slot) + 1, MPI_REQUEST_NULL);
    detail::check_mpi(MPI_Iallreduce(MPI_IN_PLACE, data, static_cast<int>(count), detail::mpi_type(dtype), MPI_SUM,
                                     comm(), &requests_[static_cast<size_t>(slot)]),
                      "MPI_Iallreduce");
  }
  void wait(int slot) override {
    detail::check_mpi(MPI_Wait(&requests_.at(static_cast<size_t>(slot)), MPI_STATUS_IGNORE), "MPI_Wait");
  }
  void poll() override {
    int done = 0;
    if (!requests_.empty())
      detail::check_mpi(MPI_Testall(static_cast<int>(requests_.size()), requests_.data(), &done, MPI_STATUSES_IGNORE),
                        "MPI_Testall");
  }
  void check_uniform(int64_t value, const std::string& what) override { dist::check_uniform(value, what); }

 private:
  std::vector<MPI_Request> requests_;  // by slot; MPI_REQUEST_NULL when none is in flight
};

/// Joins MPI for the life of main() (init() now, finalize() at the end). The job must end
/// through exit(): one rank that fails must take the others down (MPI_Abort) rather than
/// finalize, which would wait for ranks stuck in a collective with it.
class Environment {
 public:
  Environment(int& argc, char**& argv) { init(&argc, &argv); }
  Environment(const Environment&) = delete;
  Environment& operator=(const Environment&) = delete;
  ~Environment() {
    if (std::uncaught_exceptions() > 0) abort("dist: " + rank_tag() + "an exception escaped main()");
    finalize();
  }
  /// main's return value: finalize on 0; any other code ends all ranks (abort) when there are several.
  int exit(int code) {
    if (code != 0 && world_size() > 1) abort("", code);
    finalize();
    return code;
  }
};

}  // namespace dg::dist

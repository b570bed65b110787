// tests/dist/dist_fail.cpp: a short data-parallel training in which rank 1 fails at step 3,
// for the CTest tests that the whole job then ends, at once, with a clear error (dist_fail_*):
//   mpiexec -n 2 dist_fail throw   # rank 1 throws dg::Error: one line naming the rank, then MPI_Abort
//   mpiexec -n 2 dist_fail abort   # rank 1 calls std::abort(): the launcher ends the other ranks
// Rank 0 is inside a collective (the bucket sums of step 3) when rank 1 fails; without the
// abort it would wait there forever.
#include <densegrad/densegrad.hpp>
#include <densegrad/dist/dist.hpp>

#include <cstdio>
#include <cstdlib>
#include <string>

int train(const std::string& mode) {
  using namespace dg;
  try {
    Generator g(1);
    nn::Linear<float> model(16, 4, true, g);
    dist::broadcast_parameters(model);
    dist::MpiCollective collective;
    dist::Reducer<float> reducer(model, collective);
    optim::SGD<float> opt(model.parameters(), optim::SGDOptions().lr(0.1));
    Generator data_gen(10 + static_cast<uint64_t>(dist::rank()));
    for (int step = 1; step <= 10; ++step) {
      if (step == 3 && dist::rank() == 1) {
        if (mode == "abort") std::abort();
        DG_THROW("injected failure at step ", step);
      }
      Tensor<float> loss = sum(pow(model.forward(randn<float>({8, 16}, data_gen)), 2.0));
      loss.backward();
      reducer.finish();
      opt.step();
      opt.zero_grad();
      std::printf("step %d: loss %.4f\n", step, double(loss.item()));
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "dist_fail: error: %s%s\n", dist::rank_tag().c_str(), e.what());
    return 1;
  }
  return 0;
}

int main(int argc, char** argv) {
  dg::dist::Environment mpi(argc, argv);
  const std::string mode = argc > 1 ? argv[1] : "throw";
  return mpi.exit(train(mode));  // non-zero on rank 1: MPI_Abort ends rank 0 too
}

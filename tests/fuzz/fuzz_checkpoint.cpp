// tests/fuzz/fuzz_checkpoint.cpp: libFuzzer target for an rdnet_train checkpoint (a safetensors
// file with __metadata__) taken through the steps `rdnet_train --resume` takes: the file is parsed,
// then the model (an RDNet nano), AdamW, the schedule, the RNG, the counters and the metrics
// history are restored from it. Each step may reject the file with dg::Error; nothing may crash.
// Not the command-line half of --resume (the saved settings go through CLI11 in train.cpp).
#include <rdnet/rdnet.hpp>
#include <rdnet/train_util.hpp>

#include <stdexcept>

#include "fuzz_util.hpp"

namespace {

// What rdnet_train has built when it reads the checkpoint; built once (making the model per input
// would take most of the time).
struct Resumable {
  dg::Generator init_gen{0};
  rdnet::RDNet<float> model{rdnet::RDNetConfig::nano(), init_gen};
  dg::optim::AdamW<float> opt{dg::optim::timm_param_groups(model, 0.05),
                              dg::optim::AdamWOptions().lr(1e-3).weight_decay(0.05)};
  dg::optim::CosineSchedule sched{1e-3, 100, 10, 1e-5, 1e-6};
  std::mt19937_64 engine;
};

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static Resumable r;
  train_util::Checkpoint ck;
  bool parsed = false;
  fuzz::accept_or_reject([&] {  // Checkpoint::load, from memory
    dg::io::Safetensors st = dg::io::parse_safetensors(data, size, "fuzz checkpoint");
    ck = {std::move(st.tensors), std::move(st.metadata)};
    parsed = true;
  });
  if (!parsed) return 0;
  // Each step on its own, so a file that fails one still reaches the others.
  fuzz::accept_or_reject([&] { r.model.load_state_dict(ck.get<float>("model")); });
  fuzz::accept_or_reject([&] { r.model.load_state_dict(ck.get<float>("model"), /*strict=*/false); });
  fuzz::accept_or_reject([&] { r.opt.load_state_dict(ck.get<float>("optim")); });
  fuzz::accept_or_reject([&] { r.sched.load_state_dict(ck.get<double>("sched")); });
  fuzz::accept_or_reject([&] { ck.get_rng("rng.default_generator", r.engine); });
  fuzz::accept_or_reject([&] { ck.get_int("train.epoch"); });
  fuzz::accept_or_reject([&] { ck.get_int("train.step"); });
  fuzz::accept_or_reject([&] { ck.get_double("train.best_acc"); });
  fuzz::accept_or_reject([&] { train_util::parse_metrics_csv(ck.meta("metrics")); });
  return 0;
}

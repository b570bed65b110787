// rdnet_infer: run an RDNet on a batch of images stored as .npy and write the logits.
//   rdnet_infer --model tiny --weights W.safetensors --input X.npy --output Y.npy
// X: float32 (N, in_chans, H, W), already normalized; Y: float32 (N, num_classes).
// Weights are a timm state dict in safetensors (the original "stem.stem." keys work too), or
// a checkpoint written by rdnet_train (its "model.*" tensors are used).
#include <CLI/CLI.hpp>

#include <cstdio>
#include <iostream>

#include "rdnet.hpp"

int main(int argc, char** argv) {
  CLI::App app{"rdnet_infer: RDNet logits for a batch of images (.npy in, .npy out)"};
  std::string model_name = "tiny", weights, input, output, device = "cpu";
  int64_t num_classes = 1000, in_chans = 3, batch = 16;
  app.add_option("--model", model_name, "tiny, small, base, large or nano")->capture_default_str();
  app.add_option("--weights", weights, "timm state dict (.safetensors)")->required();
  app.add_option("--input", input, "float32 .npy of shape (N, in_chans, H, W)")->required();
  app.add_option("--output", output, "where to write float32 logits (N, num_classes) as .npy")->required();
  app.add_option("--num-classes", num_classes, "classifier outputs")->capture_default_str();
  app.add_option("--in-chans", in_chans, "input channels")->capture_default_str();
  app.add_option("--batch", batch, "images per forward pass")->capture_default_str()->check(CLI::PositiveNumber);
  app.add_option("--device", device, "cpu or cuda (the first GPU; needs a CUDA build)")
      ->capture_default_str()
      ->check(CLI::IsMember({"cpu", "cuda"}));
  CLI11_PARSE(app, argc, argv);

  try {
    rdnet::RDNetConfig cfg = rdnet::RDNetConfig::by_name(model_name);
    cfg.num_classes = num_classes;
    cfg.in_chans = in_chans;
    rdnet::RDNet<float> model(cfg);
    // an rdnet_train checkpoint holds the model under "model."; anything else is a timm state dict
    bool is_checkpoint = false;
    std::map<std::string, dg::Tensor<float>> from_checkpoint;
    for (auto& [k, v] : dg::io::load_safetensors<float>(weights))
      if (k.rfind("model.", 0) == 0) {
        is_checkpoint = true;
        from_checkpoint.emplace(k.substr(6), v);
      }
    if (is_checkpoint) model.load_state_dict(from_checkpoint);
    else model.load_timm(weights);
    model.eval();
    const dg::Device dev = device == "cuda" ? dg::Device::cuda(0) : dg::Device::cpu();
    DG_CHECK(dev.is_cpu() || dg::has_cuda_kernels<float>(),
             "--device cuda: this rdnet_infer was built without CUDA (configure with nvcc present)");
    model.to(dev);

    dg::Tensor<float> x = dg::io::load_npy<float>(input);
    DG_CHECK(x.dim() == 4 && x.size(1) == in_chans, "rdnet_infer: ", input, " holds shape ", dg::shape_str(x.shape()),
             ", expected (N, ", in_chans, ", H, W)");
    dg::NoGradGuard no_grad;
    std::vector<dg::Tensor<float>> chunks;
    for (int64_t i = 0; i < x.size(0); i += batch)
      chunks.push_back(model.forward(x.narrow(0, i, std::min(batch, x.size(0) - i)).to(dev)).to(dg::Device::cpu()));
    dg::Tensor<float> logits = chunks.empty() ? dg::zeros<float>({0, num_classes}) : dg::concat(chunks, 0);
    dg::io::save_npy(output, logits);
    std::printf("rdnet_infer: %s, %lld images -> %s (%lld x %lld logits)\n", model_name.c_str(),
                static_cast<long long>(x.size(0)), output.c_str(), static_cast<long long>(logits.size(0)),
                static_cast<long long>(logits.size(1)));
  } catch (const std::exception& e) {
    std::fprintf(stderr, "rdnet_infer: error: %s\n", e.what());
    return 1;
  }
  return 0;
}

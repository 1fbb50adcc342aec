// classifier_net.h — the example ResNet as a torch::nn::Module, and a synthetic input.
//
// Contract
//  - The module's parameters and buffers carry exactly the names, shapes and dtypes of
//    ClassifierTensors(config) (torchvision's ResNet names), so a checkpoint written by
//    weightd-gen, or by torchvision, binds into it with weightd::shim::bind(strict=true).
//  - Construction allocates and default-initialises every parameter (LibTorch has no
//    allocation-free construction); callers then replace them by binding.
//  - Like any torch::nn::Module, a ClassifierNet is not thread-safe; forward() on one
//    instance from several threads at once needs InferenceMode and no training.
//  - The constructor throws weightd::Error (InvalidArgument) for an invalid config.
#pragma once

#include <cstdint>

#include <torch/torch.h>

#include "classifier_spec.h"

namespace weightd::example {

// One residual block: torchvision's BasicBlock or Bottleneck (stride on the 3x3 conv).
class ResidualBlockImpl : public torch::nn::Module {
 public:
  ResidualBlockImpl(BlockKind kind, std::int64_t inplanes, std::int64_t planes, std::int64_t expansion,
                    std::int64_t stride, bool downsample);
  torch::Tensor forward(torch::Tensor x);

 private:
  BlockKind kind_;
  torch::nn::Conv2d conv1_{nullptr}, conv2_{nullptr}, conv3_{nullptr};
  torch::nn::BatchNorm2d bn1_{nullptr}, bn2_{nullptr}, bn3_{nullptr};
  torch::nn::ReLU relu_{nullptr};
  torch::nn::Sequential downsample_{nullptr};  // "0": 1x1 conv, "1": BatchNorm
};
TORCH_MODULE(ResidualBlock);

class ClassifierNetImpl : public torch::nn::Module {
 public:
  explicit ClassifierNetImpl(ClassifierConfig config);
  // images: float [N, in_channels, H, W] -> logits float [N, num_classes].
  torch::Tensor forward(torch::Tensor images);
  const ClassifierConfig& config() const { return config_; }

 private:
  ClassifierConfig config_;
  torch::nn::Conv2d conv1_{nullptr};
  torch::nn::BatchNorm2d bn1_{nullptr};
  torch::nn::ReLU relu_{nullptr};
  torch::nn::MaxPool2d maxpool_{nullptr};
  std::vector<torch::nn::Sequential> stages_;  // "layer1", "layer2", ...
  torch::nn::AdaptiveAvgPool2d avgpool_{nullptr};
  torch::nn::Linear fc_{nullptr};
};
TORCH_MODULE(ClassifierNet);

// A deterministic batch of `batch` N(0,1) images of the config's size, from `seed` alone
// (the stream "input" of synthetic.h), identical on every machine.
torch::Tensor SyntheticImages(const ClassifierConfig& config, std::uint64_t seed, std::int64_t batch = 1);

}  // namespace weightd::example

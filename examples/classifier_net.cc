#include "classifier_net.h"

#include <utility>

#include "synthetic.h"

namespace weightd::example {
namespace {

namespace nn = torch::nn;

nn::Conv2d Conv(std::int64_t in, std::int64_t out, std::int64_t k, std::int64_t stride, std::int64_t padding) {
  return nn::Conv2d(nn::Conv2dOptions(in, out, k).stride(stride).padding(padding).bias(false));
}

}  // namespace

ResidualBlockImpl::ResidualBlockImpl(BlockKind kind, std::int64_t inplanes, std::int64_t planes,
                                     std::int64_t expansion, std::int64_t stride, bool downsample)
    : kind_(kind) {
  // Registration order is torchvision's, so that named_parameters() lists in state_dict order.
  if (kind == BlockKind::kBasic) {
    conv1_ = register_module("conv1", Conv(inplanes, planes, 3, stride, 1));
    bn1_ = register_module("bn1", nn::BatchNorm2d(planes));
    relu_ = register_module("relu", nn::ReLU(nn::ReLUOptions().inplace(true)));
    conv2_ = register_module("conv2", Conv(planes, planes, 3, 1, 1));
    bn2_ = register_module("bn2", nn::BatchNorm2d(planes));
  } else {
    conv1_ = register_module("conv1", Conv(inplanes, planes, 1, 1, 0));
    bn1_ = register_module("bn1", nn::BatchNorm2d(planes));
    conv2_ = register_module("conv2", Conv(planes, planes, 3, stride, 1));
    bn2_ = register_module("bn2", nn::BatchNorm2d(planes));
    conv3_ = register_module("conv3", Conv(planes, planes * expansion, 1, 1, 0));
    bn3_ = register_module("bn3", nn::BatchNorm2d(planes * expansion));
    relu_ = register_module("relu", nn::ReLU(nn::ReLUOptions().inplace(true)));
  }
  if (downsample) {
    downsample_ = register_module(
        "downsample", nn::Sequential(Conv(inplanes, planes * expansion, 1, stride, 0),
                                     nn::BatchNorm2d(planes * expansion)));
  }
}

torch::Tensor ResidualBlockImpl::forward(torch::Tensor x) {
  torch::Tensor out = relu_(bn1_(conv1_(x)));
  out = bn2_(conv2_(out));
  if (kind_ == BlockKind::kBottleneck) out = bn3_(conv3_(relu_(out)));
  out = out + (downsample_ ? downsample_->forward(x) : x);
  return relu_(out);
}

ClassifierNetImpl::ClassifierNetImpl(ClassifierConfig config) : config_(std::move(config)) {
  const Status valid = ValidateConfig(config_);
  if (!valid.ok()) throw Error(valid);
  const ClassifierConfig& c = config_;
  conv1_ = register_module("conv1", Conv(c.in_channels, c.stem_width, 7, 2, 3));
  bn1_ = register_module("bn1", nn::BatchNorm2d(c.stem_width));
  relu_ = register_module("relu", nn::ReLU(nn::ReLUOptions().inplace(true)));
  maxpool_ = register_module("maxpool", nn::MaxPool2d(nn::MaxPool2dOptions(3).stride(2).padding(1)));
  std::int64_t inplanes = c.stem_width;
  const std::int64_t exp = c.expansion();
  for (std::size_t s = 0; s < c.blocks_per_stage.size(); ++s) {
    const std::int64_t planes = c.widths[s];
    nn::Sequential stage;
    for (int b = 0; b < c.blocks_per_stage[s]; ++b) {
      const std::int64_t stride = (b == 0 && s > 0) ? 2 : 1;
      const bool downsample = b == 0 && (stride != 1 || inplanes != planes * exp);
      // Sequential names its children "0", "1", ... as torchvision's nn.Sequential does.
      stage->push_back(ResidualBlock(c.block, inplanes, planes, exp, stride, downsample));
      inplanes = planes * exp;
    }
    stages_.push_back(register_module("layer" + std::to_string(s + 1), stage));
  }
  avgpool_ = register_module("avgpool", nn::AdaptiveAvgPool2d(nn::AdaptiveAvgPool2dOptions({1, 1})));
  fc_ = register_module("fc", nn::Linear(inplanes, c.num_classes));
}

torch::Tensor ClassifierNetImpl::forward(torch::Tensor images) {
  torch::Tensor x = maxpool_(relu_(bn1_(conv1_(images))));
  for (nn::Sequential& stage : stages_) x = stage->forward(x);
  x = torch::flatten(avgpool_(x), 1);
  return fc_(x);
}

torch::Tensor SyntheticImages(const ClassifierConfig& config, std::uint64_t seed, std::int64_t batch) {
  torch::Tensor images = torch::empty({batch, config.in_channels, config.image_size, config.image_size}, torch::kFloat32);
  NormalValues(StreamKey(seed, "input"), 0, 1.0,
               {images.data_ptr<float>(), static_cast<std::size_t>(images.numel())});
  return images;
}

}  // namespace weightd::example

// classifier_spec.h — tensor lists (names, dtypes, shapes) of the example checkpoints.
//
// Contract
//  - Pure functions of their arguments: no I/O, no torch, no shared state; thread-safe.
//  - The classifier tensors are named exactly as torchvision's ResNet state_dict names them
//    ("conv1.weight", "layer1.0.downsample.1.running_var", "fc.bias", ...) and listed in
//    state_dict order (per module: parameters, then buffers, then children), so a checkpoint
//    written from this list loads into torchvision and into examples/classifier_net.h alike.
//  - "dit5b" is the reference DiT-like workload of /work/shared/GPU.md and DESIGN.md (270 BF16
//    tensors, 10,192,527,360 bytes); "glm9b" follows the Hugging Face GLM-4-9B layout
//    ("model.layers.{i}.self_attn.q_proj.weight", ...). Both exist to give benchmarks
//    realistic tensor counts and sizes; no network in this repository runs them.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "safetensors_writer.h"
#include "status_macros.h"

namespace weightd::example {

enum class BlockKind { kBasic, kBottleneck };

// A ResNet-style image classifier (He et al. 2015, torchvision's v1.5 variant: the stride of
// a bottleneck sits on its 3x3 convolution).
struct ClassifierConfig {
  std::string name;
  std::int64_t in_channels = 3;
  std::int64_t stem_width = 64;          // output channels of conv1
  BlockKind block = BlockKind::kBottleneck;
  std::vector<int> blocks_per_stage;     // e.g. {3, 4, 6, 3}
  std::vector<std::int64_t> widths;      // inner width of each stage, e.g. {64, 128, 256, 512}
  std::int64_t num_classes = 1000;
  std::int64_t image_size = 224;         // the synthetic input is in_channels x image_size^2

  // Output channels of a block are width * expansion.
  std::int64_t expansion() const { return block == BlockKind::kBottleneck ? 4 : 1; }
  // Channels entering fc.
  std::int64_t feature_width() const;
};

// InvalidArgument unless stages are non-empty, widths/blocks agree in length and every size
// is positive.
Status ValidateConfig(const ClassifierConfig& config);

// "tiny" (basic blocks [1,1], widths [8,16], 10 classes, 32x32 input; ~26 KB) or
// "classifier" (ResNet-50: bottleneck [3,4,6,3], widths 64..512, 1000 classes, 224x224).
// NotFound for any other name.
Result<ClassifierConfig> ClassifierPreset(std::string_view name);

// The state_dict tensors of the classifier: F32 weights and BatchNorm statistics, and an
// I64 scalar (shape []) num_batches_tracked per BatchNorm.
std::vector<st::TensorSpec> ClassifierTensors(const ClassifierConfig& config);

std::vector<st::TensorSpec> Dit5bTensors();
std::vector<st::TensorSpec> Glm9bTensors();

// Every preset name, for help texts: tiny, classifier, dit5b, glm9b.
std::vector<std::string> PresetNames();
// The tensor list of any preset; NotFound (reason "example.unknown_preset") for other names.
Result<std::vector<st::TensorSpec>> PresetTensors(std::string_view preset);
// True for the presets that ClassifierPreset() knows.
bool IsClassifierPreset(std::string_view preset);

// Sum of nbytes() over the list.
std::uint64_t TotalBytes(const std::vector<st::TensorSpec>& tensors);

}  // namespace weightd::example

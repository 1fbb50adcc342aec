#include "classifier_spec.h"

#include <utility>

namespace weightd::example {
namespace {

using st::TensorSpec;

void AddConv(std::vector<TensorSpec>& out, const std::string& prefix, std::int64_t in, std::int64_t out_ch,
             std::int64_t k) {
  out.push_back({prefix + ".weight", DType::kF32, {out_ch, in, k, k}});
}

void AddBatchNorm(std::vector<TensorSpec>& out, const std::string& prefix, std::int64_t c) {
  out.push_back({prefix + ".weight", DType::kF32, {c}});
  out.push_back({prefix + ".bias", DType::kF32, {c}});
  out.push_back({prefix + ".running_mean", DType::kF32, {c}});
  out.push_back({prefix + ".running_var", DType::kF32, {c}});
  out.push_back({prefix + ".num_batches_tracked", DType::kI64, {}});
}

}  // namespace

std::int64_t ClassifierConfig::feature_width() const {
  return widths.empty() ? stem_width : widths.back() * expansion();
}

Status ValidateConfig(const ClassifierConfig& c) {
  const std::string what = "classifier config '" + c.name + "'";
  if (c.blocks_per_stage.empty()) return InvalidArgument(what + " has no stages", "example.bad_config");
  if (c.blocks_per_stage.size() != c.widths.size())
    return InvalidArgument(what + " has " + std::to_string(c.blocks_per_stage.size()) + " stages but " +
                               std::to_string(c.widths.size()) + " widths",
                           "example.bad_config");
  for (int b : c.blocks_per_stage)
    if (b <= 0) return InvalidArgument(what + " has a stage without blocks", "example.bad_config");
  for (std::int64_t w : c.widths)
    if (w <= 0) return InvalidArgument(what + " has a non-positive width", "example.bad_config");
  if (c.in_channels <= 0 || c.stem_width <= 0 || c.num_classes <= 0 || c.image_size <= 0)
    return InvalidArgument(what + " has a non-positive size", "example.bad_config");
  return Status::Ok();
}

Result<ClassifierConfig> ClassifierPreset(std::string_view name) {
  ClassifierConfig c;
  c.name = std::string(name);
  if (name == "tiny") {
    c.stem_width = 8;
    c.block = BlockKind::kBasic;
    c.blocks_per_stage = {1, 1};
    c.widths = {8, 16};
    c.num_classes = 10;
    c.image_size = 32;
    return c;
  }
  if (name == "classifier") {
    c.stem_width = 64;
    c.block = BlockKind::kBottleneck;
    c.blocks_per_stage = {3, 4, 6, 3};
    c.widths = {64, 128, 256, 512};
    c.num_classes = 1000;
    c.image_size = 224;
    return c;
  }
  return NotFound("no classifier preset named '" + std::string(name) + "' (known: tiny, classifier)",
                  "example.unknown_preset");
}

std::vector<TensorSpec> ClassifierTensors(const ClassifierConfig& c) {
  std::vector<TensorSpec> out;
  AddConv(out, "conv1", c.in_channels, c.stem_width, 7);
  AddBatchNorm(out, "bn1", c.stem_width);
  std::int64_t inplanes = c.stem_width;
  const std::int64_t exp = c.expansion();
  for (std::size_t s = 0; s < c.blocks_per_stage.size(); ++s) {
    const std::int64_t planes = c.widths[s];
    const bool strided = s > 0;
    for (int b = 0; b < c.blocks_per_stage[s]; ++b) {
      const std::string p = "layer" + std::to_string(s + 1) + "." + std::to_string(b);
      if (c.block == BlockKind::kBasic) {
        AddConv(out, p + ".conv1", inplanes, planes, 3);
        AddBatchNorm(out, p + ".bn1", planes);
        AddConv(out, p + ".conv2", planes, planes, 3);
        AddBatchNorm(out, p + ".bn2", planes);
      } else {
        AddConv(out, p + ".conv1", inplanes, planes, 1);
        AddBatchNorm(out, p + ".bn1", planes);
        AddConv(out, p + ".conv2", planes, planes, 3);
        AddBatchNorm(out, p + ".bn2", planes);
        AddConv(out, p + ".conv3", planes, planes * exp, 1);
        AddBatchNorm(out, p + ".bn3", planes * exp);
      }
      // Only the first block of a stage changes stride or width, as in torchvision.
      if (b == 0 && (strided || inplanes != planes * exp)) {
        AddConv(out, p + ".downsample.0", inplanes, planes * exp, 1);
        AddBatchNorm(out, p + ".downsample.1", planes * exp);
      }
      inplanes = planes * exp;
    }
  }
  out.push_back({"fc.weight", DType::kF32, {c.num_classes, inplanes}});
  out.push_back({"fc.bias", DType::kF32, {c.num_classes}});
  return out;
}

std::vector<TensorSpec> Dit5bTensors() {
  constexpr std::int64_t kDim = 3072, kFfn = 14336;
  constexpr int kBlocks = 30;
  std::vector<TensorSpec> out;
  out.reserve(kBlocks * 9);
  for (int i = 0; i < kBlocks; ++i) {
    const std::string p = "blocks." + std::to_string(i);
    for (const char* m : {"q", "k", "v", "o"})
      out.push_back({p + ".attn." + m + ".weight", DType::kBF16, {kDim, kDim}});
    out.push_back({p + ".ffn.w1.weight", DType::kBF16, {kFfn, kDim}});
    out.push_back({p + ".ffn.w2.weight", DType::kBF16, {kDim, kFfn}});
    out.push_back({p + ".ffn.w3.weight", DType::kBF16, {kFfn, kDim}});
    out.push_back({p + ".norm1.weight", DType::kBF16, {kDim}});
    out.push_back({p + ".norm2.weight", DType::kBF16, {kDim}});
  }
  return out;
}

// GLM-4-9B as transformers' GlmForCausalLM names it (glm-4-9b-hf): fused gate/up projection,
// biases on q/k/v only, grouped-query attention with 2 key/value heads, untied lm_head.
std::vector<TensorSpec> Glm9bTensors() {
  constexpr std::int64_t kHidden = 4096, kInter = 13696, kVocab = 151552;
  constexpr std::int64_t kHeadDim = 128, kHeads = 32, kKvHeads = 2;
  constexpr std::int64_t kQ = kHeads * kHeadDim, kKv = kKvHeads * kHeadDim;
  constexpr int kLayers = 40;
  std::vector<TensorSpec> out;
  out.push_back({"model.embed_tokens.weight", DType::kBF16, {kVocab, kHidden}});
  for (int i = 0; i < kLayers; ++i) {
    const std::string p = "model.layers." + std::to_string(i);
    out.push_back({p + ".self_attn.q_proj.weight", DType::kBF16, {kQ, kHidden}});
    out.push_back({p + ".self_attn.q_proj.bias", DType::kBF16, {kQ}});
    out.push_back({p + ".self_attn.k_proj.weight", DType::kBF16, {kKv, kHidden}});
    out.push_back({p + ".self_attn.k_proj.bias", DType::kBF16, {kKv}});
    out.push_back({p + ".self_attn.v_proj.weight", DType::kBF16, {kKv, kHidden}});
    out.push_back({p + ".self_attn.v_proj.bias", DType::kBF16, {kKv}});
    out.push_back({p + ".self_attn.o_proj.weight", DType::kBF16, {kHidden, kQ}});
    out.push_back({p + ".mlp.gate_up_proj.weight", DType::kBF16, {2 * kInter, kHidden}});
    out.push_back({p + ".mlp.down_proj.weight", DType::kBF16, {kHidden, kInter}});
    out.push_back({p + ".input_layernorm.weight", DType::kBF16, {kHidden}});
    out.push_back({p + ".post_attention_layernorm.weight", DType::kBF16, {kHidden}});
  }
  out.push_back({"model.norm.weight", DType::kBF16, {kHidden}});
  out.push_back({"lm_head.weight", DType::kBF16, {kVocab, kHidden}});
  return out;
}

std::vector<std::string> PresetNames() { return {"tiny", "classifier", "dit5b", "glm9b"}; }

bool IsClassifierPreset(std::string_view preset) { return preset == "tiny" || preset == "classifier"; }

Result<std::vector<TensorSpec>> PresetTensors(std::string_view preset) {
  if (IsClassifierPreset(preset)) {
    ASSIGN_OR_RETURN(ClassifierConfig c, ClassifierPreset(preset));
    return ClassifierTensors(c);
  }
  if (preset == "dit5b") return Dit5bTensors();
  if (preset == "glm9b") return Glm9bTensors();
  return NotFound("no preset named '" + std::string(preset) + "' (known: tiny, classifier, dit5b, glm9b)",
                  "example.unknown_preset");
}

std::uint64_t TotalBytes(const std::vector<TensorSpec>& tensors) {
  std::uint64_t total = 0;
  for (const TensorSpec& t : tensors) total += t.nbytes();
  return total;
}

}  // namespace weightd::example

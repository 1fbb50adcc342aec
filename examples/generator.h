// generator.h — writes the synthetic example checkpoints (the library behind weightd-gen).
//
// Contract
//  - Output is Hugging Face's layout: one model.safetensors, or, when the tensors exceed
//    shard_size, model-0000N-of-0000M.safetensors plus model.safetensors.index.json
//    ({"metadata":{"total_size":N},"weight_map":{name: file}}). Shards are filled greedily in
//    tensor order, as transformers' save_pretrained does: a new shard starts when the next
//    tensor would push the current one past shard_size (a single larger tensor gets a shard
//    of its own).
//  - Bytes are a pure function of (preset, seed, shard_size): the value of element k of a
//    tensor depends only on (seed, tensor name, k) (see synthetic.h), so any two runs, on
//    any machine and with any thread count, write identical files.
//  - Each file is written to a temporary name and renamed into place; the index is written
//    last, so an index on disk implies its shards are complete.
//  - Generate() refuses (FailedPrecondition, "example.stale_checkpoint") to write into a
//    directory that holds checkpoint files of another layout that it would not overwrite,
//    since loaders would then see a mix of old and new files.
//  - Generate() is thread-safe for distinct output directories. It starts `threads` worker
//    threads for its own duration.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "safetensors_writer.h"
#include "status_macros.h"

namespace weightd::example {

inline constexpr std::uint64_t kDefaultShardSize = std::uint64_t{4} << 30;  // 4 GiB
inline constexpr char kIndexFileName[] = "model.safetensors.index.json";
inline constexpr char kSingleFileName[] = "model.safetensors";

struct GenerateOptions {
  std::string preset;                          // tiny | classifier | dit5b | glm9b
  std::string out_dir;                         // created if missing
  std::uint64_t seed = 0;
  std::uint64_t shard_size = kDefaultShardSize;  // 0: always one file
  unsigned threads = 0;                        // 0: std::thread::hardware_concurrency()
};

struct GeneratedFile {
  std::string path;
  std::size_t tensors = 0;
  std::uint64_t bytes = 0;  // file size, header included
};

struct GenerateReport {
  std::vector<GeneratedFile> files;
  std::string index_path;          // empty for a single file
  std::size_t tensors = 0;
  std::uint64_t tensor_bytes = 0;  // sum of the tensors' sizes (the index's total_size)
  std::uint64_t file_bytes = 0;    // sum of the files' sizes
  double seconds = 0;
};

// How a tensor's values are made: every element `value` (kConstant), or N(0, stddev^2) samples
// (kNormal).
struct InitRule {
  enum class Kind { kConstant, kNormal };
  Kind kind = Kind::kConstant;
  double value = 0;   // kConstant
  double stddev = 0;  // kNormal
};

// The rule for tensor `t` of `preset`:
//  - classifier presets: conv and linear weights N(0, 2 / fan_in) (He), so activations keep
//    their scale through conv+ReLU; BatchNorm weight 1, bias 0, running_mean 0,
//    running_var 1, num_batches_tracked 0, except the last BatchNorm of each residual branch
//    (bn2 of a basic block, bn3 of a bottleneck) whose weight is 1/sqrt(blocks), so that the
//    residual sums do not double the variance block after block (the idea of Fixup and of
//    torchvision's zero_init_residual, without silencing the branches); fc.bias 0.
//  - dit5b / glm9b: every tensor N(0, 0.02^2), the usual transformer initialisation scale.
InitRule RuleFor(std::string_view preset, const st::TensorSpec& t);

// Greedy sharding: the tensor indices of each shard, in order.
std::vector<std::vector<std::size_t>> PlanShards(const std::vector<st::TensorSpec>& tensors, std::uint64_t shard_size);

// "model-00002-of-00005.safetensors"
std::string ShardFileName(std::size_t index, std::size_t count);

Result<GenerateReport> Generate(const GenerateOptions& options);

}  // namespace weightd::example

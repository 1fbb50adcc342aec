// models.h — checkpoints for the benchmarks: the reference DiT layout (/work/shared/GPU.md,
// examples/classifier_spec.h Dit5bTensors) with its names, dtype and proportions, but any
// tensor count and a chosen total size, so a benchmark runs in seconds on a small machine.
// Pure functions; thread-safe.
#pragma once

#include <cstdint>
#include <vector>

#include "safetensors_writer.h"

namespace weightd::bench {

// The first `count` tensors of a DiT-like stack ("blocks.{i}.attn.q.weight", ..., 9 per block:
// q/k/v/o [d,d], ffn.w1/w3 [f,d], ffn.w2 [d,f], norm1/norm2 [d], BF16), with the width d (and
// f = 14/3 d, as 14336/3072) chosen so that the total is close to `target_bytes` (never
// below d = 8). The exact total is TotalBytes() of the result.
std::vector<st::TensorSpec> DitLikeTensors(int count, std::uint64_t target_bytes);

}  // namespace weightd::bench

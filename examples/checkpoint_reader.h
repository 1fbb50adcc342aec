// checkpoint_reader.h — loads a safetensors checkpoint into memory the plain way (read the
// files), as a program without weightd would; the baseline of weightd-example --from-file.
//
// Contract
//  - Accepts Hugging Face's layouts: model.safetensors.index.json naming the shard of every
//    tensor, else a single model.safetensors. Every header is validated by the strict parser
//    (safetensors.h); an index whose weight_map disagrees with the shards' headers, or that
//    names a file outside the directory, is DataLoss ("example.index_mismatch").
//  - Each file's data section is read (pread) into one page-aligned heap buffer; the tensors
//    are views of it (torch::from_blob) whose deleters share ownership of the buffer, which is
//    freed when the last tensor of that file dies.
//  - Thread-safe (no shared state); the returned tensors are CPU tensors, writable.
#pragma once

#include <map>
#include <string>

#include <torch/torch.h>

#include "status_macros.h"

namespace weightd::example {

struct CheckpointReadStats {
  std::size_t files = 0;
  std::uint64_t bytes = 0;  // data bytes read
};

Result<std::map<std::string, torch::Tensor>> ReadCheckpoint(const std::string& dir,
                                                            CheckpointReadStats* stats = nullptr);

}  // namespace weightd::example

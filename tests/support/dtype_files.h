// dtype_files.h — test support: safetensors files of every dtype, written by a writer that is
// not weightd's (tests/data/dtypes/write_dtypes.py, the Python standard library alone), and
// what they hold, so that tests can check what weightd serves against what was written.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "weightd/status.h"

namespace weightd::testing {

struct ExpectedTensor {
  std::string name;
  std::string dtype;                // as the file's header spells it ("F8_E8M0")
  std::vector<std::int64_t> shape;  // as the header has it
  std::string bytes;                // the tensor's data, as written
  // Each element's number where the dtype has one (NaN for null; C64 has two per element);
  // empty where the writer gave none.
  std::vector<double> values;
  // Set for files that the safetensors library wrote from torch tensors (scripts/gpu-check.sh):
  // the torch dtype ("float4_e2m1fn_x2") and shape of the tensor it was written from.
  std::string torch_dtype;
  std::vector<std::int64_t> torch_shape;
};

// Runs write_dtypes.py (python3) to write `dir`/model.safetensors; `variant` is "all" (one
// tensor of each of the 22 dtypes), "unsupported" or "partial_byte" (files a reader must
// refuse). Returns the tensors it wrote, from `dir`/expected.json.
Result<std::vector<ExpectedTensor>> WriteIndependentDtypeModel(const std::string& dir, const std::string& variant = "all");

// Reads `dir`/expected.json (the format write_dtypes.py and scripts/gpu-check.sh write).
Result<std::vector<ExpectedTensor>> ReadExpectedTensors(const std::string& dir);

// A directory holding a model.safetensors that the Python safetensors library wrote, with its
// expected.json: $WEIGHTD_SAFETENSORS_LIBRARY_DIR (scripts/gpu-check.sh sets it), or nullopt.
std::optional<std::string> SafetensorsLibraryDir();

}  // namespace weightd::testing

// safetensors_writer.h — writes safetensors files, streaming, for the generator, tests and
// benchmarks. The header is padded with spaces to a multiple of 8 bytes, as the reference
// implementation does, so the data section is 8-byte aligned.
// Not thread-safe per call; distinct calls may run concurrently on distinct paths.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <map>
#include <span>
#include <string>
#include <vector>

#include "weightd/dtype.h"
#include "status_macros.h"

namespace weightd::st {

struct TensorSpec {
  std::string name;
  DType dtype;
  std::vector<std::int64_t> shape;
  // DTypeBytes(dtype, shape). Saturates at UINT64_MAX when a dimension is negative, the size
  // overflows or sub-byte values end inside a byte, so a bad spec never looks small; WriteFile
  // rejects such specs.
  std::uint64_t nbytes() const;
};

// Fills `out` with the bytes of tensor `index` starting at byte `offset` of that tensor.
using FillFn = std::function<void(std::size_t index, std::uint64_t offset, std::span<std::byte> out)>;

// Writes the tensors in the order given (offsets ascending) to `path`, via a temporary file
// (`path` + ".tmp.<pid>", same directory) that is fsync()ed and renamed into place; on failure
// the temporary file is removed and `path` is untouched. Data is streamed through one
// reusable buffer, so memory use does not grow with tensor size; `fill` is called with
// chunks of at most a few MiB. Returns the number of bytes written (the file size).
// Specs are checked first: InvalidArgument (reason "safetensors.bad_spec") for a negative
// dimension, a size overflow, sub-byte values that do not fill whole bytes, an empty or duplicate name, the name "__metadata__", or
// invalid UTF-8 in a name or metadata. An exception thrown by `fill` becomes Internal.
Result<std::uint64_t> WriteFile(const std::string& path, const std::vector<TensorSpec>& tensors,
                                const FillFn& fill, const std::map<std::string, std::string>& metadata = {});

// The JSON header (unpadded) that WriteFile would write; for tests that craft hostile files.
// Tensors appear in the order given, after "__metadata__" (omitted when empty). Specs are
// not validated here: dimensions are written as given and invalid UTF-8 is replaced with
// U+FFFD.
std::string BuildHeaderJson(const std::vector<TensorSpec>& tensors,
                            const std::map<std::string, std::string>& metadata);

}  // namespace weightd::st

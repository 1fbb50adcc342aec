#include "checkpoint_reader.h"

#include <fcntl.h>
#include <unistd.h>

#include <cstdlib>
#include <memory>
#include <new>
#include <set>

#include <nlohmann/json.hpp>

#include "posix.h"
#include "safetensors.h"

namespace weightd::example {
namespace {

constexpr char kReasonIndex[] = "example.index_mismatch";
constexpr std::size_t kBufferAlign = 4096;

Result<torch::ScalarType> TorchType(DType t, const std::string& tensor) {
  switch (t) {
    case DType::kF64: return torch::kFloat64;
    case DType::kF32: return torch::kFloat32;
    case DType::kF16: return torch::kFloat16;
    case DType::kBF16: return torch::kBFloat16;
    case DType::kI64: return torch::kInt64;
    case DType::kI32: return torch::kInt32;
    case DType::kI16: return torch::kInt16;
    case DType::kI8: return torch::kInt8;
    case DType::kU8: return torch::kUInt8;
    case DType::kBool: return torch::kBool;
    default:
      return InvalidArgument("tensor '" + tensor + "' has dtype " + std::string(DTypeName(t)) +
                                 ", which this LibTorch cannot represent",
                             "example.unsupported_dtype");
  }
}

Result<std::string> ReadSmallFile(const std::string& path) {
  ASSIGN_OR_RETURN(posix::Fd fd, posix::Open(path, O_RDONLY | O_CLOEXEC));
  ASSIGN_OR_RETURN(posix::FileInfo info, posix::Stat(fd.get(), path));
  constexpr std::uint64_t kMaxIndex = 256 << 20;  // a 100k-tensor index is ~10 MB
  if (info.size > kMaxIndex)
    return DataLoss(path + " is " + std::to_string(info.size) + " bytes; an index is at most " +
                        std::to_string(kMaxIndex),
                    kReasonIndex);
  std::string text(info.size, '\0');
  RETURN_IF_ERROR(posix::PreadFull(fd.get(), std::as_writable_bytes(std::span(text.data(), text.size())), 0, path));
  return text;
}

// weight_map of an HF index: tensor name -> file name (a plain name inside `dir`).
Result<std::map<std::string, std::string>> ReadIndex(const std::string& path) {
  ASSIGN_OR_RETURN(std::string text, ReadSmallFile(path));
  nlohmann::json j = nlohmann::json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded() || !j.is_object() || !j.contains("weight_map") || !j["weight_map"].is_object())
    return DataLoss(path + " is not an index (a JSON object with a \"weight_map\" object)", kReasonIndex);
  std::map<std::string, std::string> map;
  for (const auto& [name, file] : j["weight_map"].items()) {
    if (!file.is_string()) return DataLoss(path + ": the file of tensor '" + name + "' is not a string", kReasonIndex);
    std::string f = file.get<std::string>();
    if (f.empty() || f == "." || f == ".." || f.find('/') != std::string::npos)
      return DataLoss(path + ": tensor '" + name + "' names file '" + f + "' outside the directory", kReasonIndex);
    map.emplace(name, std::move(f));
  }
  if (map.empty()) return DataLoss(path + " maps no tensors", kReasonIndex);
  return map;
}

struct AlignedFree {
  void operator()(std::byte* p) const { ::operator delete[](p, std::align_val_t{kBufferAlign}); }
};

}  // namespace

Result<std::map<std::string, torch::Tensor>> ReadCheckpoint(const std::string& dir, CheckpointReadStats* stats) {
  const std::string index_path = dir + "/model.safetensors.index.json";
  std::map<std::string, std::string> weight_map;
  std::set<std::string> files;
  const bool indexed = ::access(index_path.c_str(), F_OK) == 0;
  if (indexed) {
    ASSIGN_OR_RETURN(weight_map, ReadIndex(index_path));
    for (const auto& [name, file] : weight_map) files.insert(file);
  } else {
    files.insert("model.safetensors");
  }

  std::map<std::string, torch::Tensor> out;
  CheckpointReadStats local;
  for (const std::string& file : files) {
    const std::string path = dir + "/" + file;
    ASSIGN_OR_RETURN(posix::Fd fd, posix::Open(path, O_RDONLY | O_CLOEXEC));
    ASSIGN_OR_RETURN(posix::FileInfo info, posix::Stat(fd.get(), path));
    auto header = st::ReadHeader(fd.get(), info.size);
    if (!header.ok()) return header.status().WithContext(path);

    std::shared_ptr<std::byte> buffer;
    const std::size_t size = static_cast<std::size_t>(header->data_size);
    try {
      buffer.reset(new (std::align_val_t{kBufferAlign}) std::byte[std::max<std::size_t>(size, 1)], AlignedFree{});
    } catch (const std::bad_alloc&) {
      return ResourceExhausted("cannot allocate " + std::to_string(size) + " bytes for " + path, "example.oom");
    }
    RETURN_IF_ERROR(posix::PreadFull(fd.get(), {buffer.get(), size}, header->data_offset, path));
    local.files++;
    local.bytes += size;

    for (const st::TensorEntry& e : header->tensors) {
      if (indexed) {
        auto it = weight_map.find(e.name);
        if (it == weight_map.end() || it->second != file)
          return DataLoss(path + " holds tensor '" + e.name + "', which the index maps to " +
                              (it == weight_map.end() ? std::string("no file") : "'" + it->second + "'"),
                          kReasonIndex);
      }
      ASSIGN_OR_RETURN(torch::ScalarType type, TorchType(e.dtype, e.name));
      // The deleter shares the buffer: it is freed with the last tensor of this file.
      torch::Tensor t = torch::from_blob(buffer.get() + e.begin, e.shape, [buffer](void*) {},
                                         torch::TensorOptions().dtype(type));
      if (!out.emplace(e.name, std::move(t)).second)
        return DataLoss("tensor '" + e.name + "' appears in more than one file of " + dir, kReasonIndex);
    }
  }
  if (indexed) {
    for (const auto& [name, file] : weight_map)
      if (!out.contains(name))
        return DataLoss(index_path + " maps tensor '" + name + "' to '" + file + "', which does not hold it",
                        kReasonIndex);
  }
  if (stats != nullptr) *stats = local;
  return out;
}

}  // namespace weightd::example

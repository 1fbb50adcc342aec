#include "catalog.h"

#include <sys/stat.h>

#include <algorithm>
#include <fstream>
#include <set>
#include <sstream>
#include <unordered_map>

#include <nlohmann/json.hpp>

namespace weightd {
namespace {

constexpr const char* kIndexFile = "model.safetensors.index.json";
constexpr const char* kSingleFile = "model.safetensors";
constexpr std::size_t kMaxIndexSize = 64ull << 20;

bool IsPlainFileName(const std::string& n) {
  return !n.empty() && n != "." && n != ".." && n.find('/') == std::string::npos && n.find('\0') == std::string::npos;
}

// A regular file, not a symbolic link (weightd does not follow links inside model
// directories: loader.cc, OpenNoFollow), or NotFound/InvalidArgument/FailedPrecondition.
Status CheckRegular(const std::string& path) {
  struct stat st {};
  if (::lstat(path.c_str(), &st) != 0) return NotFound("missing file " + path, "catalog.missing_file");
  if (S_ISLNK(st.st_mode))
    return FailedPrecondition(path + " is a symbolic link; weightd does not follow links inside model directories "
                                     "(copy the files, or point the model's path at the directory that holds them)",
                              "loader.symlink");
  if (!S_ISREG(st.st_mode)) return InvalidArgument(path + " is not a regular file", "catalog.not_a_file");
  return Status::Ok();
}

Result<nlohmann::json> ReadIndex(const std::string& path) {
  RETURN_IF_ERROR(CheckRegular(path));
  std::ifstream in(path, std::ios::binary);
  if (!in) return NotFound("cannot read " + path, "catalog.missing_file");
  in.seekg(0, std::ios::end);
  auto size = static_cast<std::uint64_t>(in.tellg());
  if (size > kMaxIndexSize) return DataLoss(path + " is larger than 64 MiB", "catalog.bad_index");
  in.seekg(0);
  std::string text(size, '\0');
  in.read(text.data(), static_cast<std::streamsize>(size));
  auto j = nlohmann::json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) return DataLoss(path + " is not valid JSON", "catalog.bad_index");
  if (!j.is_object() || !j.contains("weight_map") || !j["weight_map"].is_object())
    return DataLoss(path + " has no \"weight_map\" object", "catalog.bad_index");
  for (auto& [name, file] : j["weight_map"].items()) {
    if (!file.is_string() || !IsPlainFileName(file.get<std::string>()))
      return DataLoss(path + ": tensor '" + name + "' maps to an invalid file name", "catalog.bad_index");
  }
  return j;
}

}  // namespace

Result<std::vector<std::string>> DiscoverShards(const std::string& dir) {
  struct stat st {};
  if (::stat(dir.c_str(), &st) != 0 || !S_ISDIR(st.st_mode))
    return NotFound("model directory " + dir + " does not exist", "catalog.missing_dir");
  const std::string index = dir + "/" + kIndexFile;
  if (::lstat(index.c_str(), &st) == 0) {  // lstat: a link is refused below, not ignored
    ASSIGN_OR_RETURN(nlohmann::json j, ReadIndex(index));
    std::set<std::string> files;
    for (auto& [name, file] : j["weight_map"].items()) files.insert(file.get<std::string>());
    if (files.empty()) return DataLoss(index + " lists no tensors", "catalog.bad_index");
    std::vector<std::string> out(files.begin(), files.end());
    for (const auto& f : out) RETURN_IF_ERROR(CheckRegular(dir + "/" + f));
    return out;
  }
  const std::string single = dir + "/" + kSingleFile;
  if (::lstat(single.c_str(), &st) == 0) {
    RETURN_IF_ERROR(CheckRegular(single));
    return std::vector<std::string>{kSingleFile};
  }
  return NotFound("no " + std::string(kSingleFile) + " or " + kIndexFile + " in " + dir, "catalog.no_weights");
}

Status CheckShardSet(const std::string& dir, const std::vector<std::string>& files,
                     const std::vector<st::Header>& headers) {
  std::unordered_map<std::string, std::string> owner;  // tensor -> file
  for (std::size_t i = 0; i < files.size(); ++i) {
    for (const auto& t : headers[i].tensors) {
      auto [it, fresh] = owner.emplace(t.name, files[i]);
      if (!fresh)
        return DataLoss("tensor '" + t.name + "' is in both " + it->second + " and " + files[i] + " (" + dir + ")",
                        "catalog.duplicate_tensor");
    }
  }
  const std::string index = dir + "/" + kIndexFile;
  struct stat st {};
  if (::stat(index.c_str(), &st) != 0) return Status::Ok();
  ASSIGN_OR_RETURN(nlohmann::json j, ReadIndex(index));
  for (auto& [name, file] : j["weight_map"].items()) {
    auto it = owner.find(name);
    if (it == owner.end() || it->second != file.get<std::string>())
      return DataLoss(index + " places tensor '" + name + "' in " + file.get<std::string>() + ", but " +
                          (it == owner.end() ? std::string("no shard has it") : "it is in " + it->second),
                      "catalog.index_mismatch");
  }
  if (owner.size() != j["weight_map"].size())
    return DataLoss(index + " lists " + std::to_string(j["weight_map"].size()) + " tensors but the shards hold " +
                        std::to_string(owner.size()),
                    "catalog.index_mismatch");
  return Status::Ok();
}

CatalogDiff Catalog::Update(const std::vector<ModelConfig>& models) {
  CatalogDiff diff;
  std::map<std::string, ModelConfig> next;
  for (const auto& m : models) next[m.name] = m;
  for (const auto& [name, m] : models_) {
    auto it = next.find(name);
    if (it == next.end()) diff.removed.push_back(name);
    else if (it->second.dir != m.dir) diff.changed.push_back(name);
    else if (!(it->second == m)) diff.updated.push_back(name);
  }
  for (const auto& [name, m] : next)
    if (!models_.count(name)) diff.added.push_back(name);
  models_ = std::move(next);
  return diff;
}

const ModelConfig* Catalog::Find(const std::string& name) const {
  auto it = models_.find(name);
  return it == models_.end() ? nullptr : &it->second;
}

}  // namespace weightd

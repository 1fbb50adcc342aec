// catalog.h — which models the daemon serves, and where their files are.
//
// The Catalog maps a model name to its directory. It is owned by the server's loop thread
// and not thread-safe. DiscoverShards() and CheckShardSet() do blocking I/O and run on
// loader threads.
#pragma once

#include <map>
#include <string>
#include <vector>

#include "config.h"
#include "safetensors.h"
#include "status_macros.h"

namespace weightd {

// The shard files of a model directory in Hugging Face layout: the files named by
// model.safetensors.index.json's weight_map (sorted, unique), or model.safetensors alone.
// File names must be plain names inside the directory (no '/', no "..").
Result<std::vector<std::string>> DiscoverShards(const std::string& dir);

// With an index, every tensor it names must be in the shard it names, and no tensor may be
// in two shards. Without an index (`dir` has only model.safetensors), only the uniqueness.
Status CheckShardSet(const std::string& dir, const std::vector<std::string>& files,
                     const std::vector<st::Header>& headers);

struct CatalogDiff {
  std::vector<std::string> added;
  std::vector<std::string> removed;
  std::vector<std::string> changed;  // same name, other directory
  std::vector<std::string> updated;  // same directory, other policy (pin, preload, priority, TTLs)
};

class Catalog {
 public:
  // Replaces the set of models and reports what changed.
  CatalogDiff Update(const std::vector<ModelConfig>& models);
  const ModelConfig* Find(const std::string& name) const;
  const std::map<std::string, ModelConfig>& models() const { return models_; }

 private:
  std::map<std::string, ModelConfig> models_;
};

}  // namespace weightd

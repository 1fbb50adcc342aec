// loader.h — reads a model's shards from disk into host-tier segments.
//
// LoadHost() is blocking and runs on a loader job thread, never on the control loop. Its
// chunked preads run on the Loader's reader pool (loader_threads), chunk_size bytes each,
// straight into the segment, so the data is read once and never copied. A failure removes
// every segment the load created; nothing of a failed load stays behind.
//
// Thread-safe: any number of LoadHost() calls may run at once (they share the reader pool).
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "config.h"
#include "host_tier.h"
#include "posix.h"
#include "safetensors.h"
#include "thread_pool.h"

namespace weightd {

struct ResidentShard {
  std::string file;  // name inside the model directory
  st::Header header;
  posix::FileInfo file_info;  // size and mtime when it was read
  HostSegment segment;
};

// A model resident in the host tier. Immutable once built; shared by the server and by
// anything that reads the segments (the GPU tier).
struct ResidentModel {
  std::string name;
  std::string dir;
  std::vector<ResidentShard> shards;
  std::uint64_t bytes = 0;  // tensor data, all shards
  std::uint32_t tensor_count = 0;

  // Unlinks the segment names (the daemon's own mappings go with the object).
  void RemoveSegments() const;
};

struct LoaderOptions {
  std::string shm_prefix;
  mode_t shm_mode = 0640;
  std::uint32_t threads = 4;
  std::uint64_t chunk_size = 16ull << 20;
};

class Loader {
 public:
  explicit Loader(LoaderOptions options);

  // `generation` makes the segment names of this load unique. `cancel` may be set by another
  // thread to abandon the load (Unavailable).
  Result<std::shared_ptr<ResidentModel>> LoadHost(const ModelConfig& model, std::uint64_t generation,
                                                  const std::atomic<bool>& cancel);

  // The segment name of a shard: "<prefix>.<model>.<generation>.<index>".
  std::string SegmentName(const std::string& model, std::uint64_t generation, std::size_t shard) const;

  std::uint64_t bytes_read() const { return bytes_read_.load(std::memory_order_relaxed); }

 private:
  Status ReadShards(const std::vector<posix::Fd>& fds, ResidentModel& model, const std::atomic<bool>& cancel);

  const LoaderOptions options_;
  ThreadPool readers_;
  std::atomic<std::uint64_t> bytes_read_{0};
};

}  // namespace weightd

#include "loader.h"

#include <fcntl.h>
#include <sys/stat.h>

#include <algorithm>
#include <condition_variable>
#include <mutex>

#include "catalog.h"

namespace weightd {

void ResidentModel::RemoveSegments() const {
  for (const auto& s : shards) (void)HostSegment::Remove(s.segment.name());
}

Loader::Loader(LoaderOptions options) : options_(std::move(options)), readers_(options_.threads, "wd-read") {}

std::string Loader::SegmentName(const std::string& model, std::uint64_t generation, std::size_t shard) const {
  return options_.shm_prefix + "." + model + "." + std::to_string(generation) + "." + std::to_string(shard);
}

Result<std::shared_ptr<ResidentModel>> Loader::LoadHost(const ModelConfig& mc, std::uint64_t generation,
                                                        const std::atomic<bool>& cancel) {
  auto model = std::make_shared<ResidentModel>();
  model->name = mc.name;
  model->dir = mc.dir;
  // Whatever this function leaves half-built is unlinked on the way out.
  struct Cleanup {
    ResidentModel* m;
    ~Cleanup() {
      if (m) m->RemoveSegments();
    }
  } cleanup{model.get()};

  ASSIGN_OR_RETURN(std::vector<std::string> files, DiscoverShards(mc.dir));
  std::vector<posix::Fd> fds;
  std::vector<st::Header> headers;
  for (std::size_t i = 0; i < files.size(); ++i) {
    const std::string path = mc.dir + "/" + files[i];
    // O_NONBLOCK: a FIFO swapped in for a shard must not hang the loader on open.
    ASSIGN_OR_RETURN(posix::Fd fd, posix::Open(path, O_RDONLY | O_NONBLOCK | O_CLOEXEC));
    ASSIGN_OR_RETURN(posix::FileInfo fi, posix::Stat(fd.get(), path));
    if (!S_ISREG(fi.mode)) return InvalidArgument(path + " is not a regular file", "loader.not_a_regular_file");
    auto header = st::ReadHeader(fd.get(), fi.size);
    if (!header.ok()) return header.status().WithContext(path);
    ResidentShard shard;
    shard.file = files[i];
    shard.header = header.value();
    shard.file_info = fi;
    headers.push_back(std::move(header).value());
    model->shards.push_back(std::move(shard));
    fds.push_back(std::move(fd));
  }
  RETURN_IF_ERROR(CheckShardSet(mc.dir, files, headers));

  for (std::size_t i = 0; i < model->shards.size(); ++i) {
    auto& shard = model->shards[i];
    const std::string name = SegmentName(mc.name, generation, i);
    // A segment of this name can only be a leftover of an earlier instance of this daemon
    // (the prefix is locked), so replacing it is safe: its old mappings stay valid.
    (void)HostSegment::Remove(name);
    ASSIGN_OR_RETURN(shard.segment, HostSegment::Create(name, shard.header.data_size, options_.shm_mode));
    model->bytes += shard.header.data_size;
    model->tensor_count += static_cast<std::uint32_t>(shard.header.tensors.size());
  }

  RETURN_IF_ERROR(ReadShards(fds, *model, cancel));

  // A file rewritten while we read it would give a mix of old and new bytes.
  for (std::size_t i = 0; i < model->shards.size(); ++i) {
    const std::string path = mc.dir + "/" + model->shards[i].file;
    ASSIGN_OR_RETURN(posix::FileInfo now, posix::Stat(fds[i].get(), path));
    if (now.size != model->shards[i].file_info.size || now.mtime_ns != model->shards[i].file_info.mtime_ns)
      return DataLoss(path + " changed while it was being loaded", "loader.file_changed");
  }
  cleanup.m = nullptr;
  return model;
}

Status Loader::ReadShards(const std::vector<posix::Fd>& fds, ResidentModel& model, const std::atomic<bool>& cancel) {
  struct Chunk {
    std::size_t shard;
    std::uint64_t offset;  // in the data section
    std::uint64_t size;
  };
  std::vector<Chunk> chunks;
  for (std::size_t i = 0; i < model.shards.size(); ++i) {
    const std::uint64_t n = model.shards[i].header.data_size;
    for (std::uint64_t off = 0; off < n; off += options_.chunk_size)
      chunks.push_back({i, off, std::min(options_.chunk_size, n - off)});
  }
  if (chunks.empty()) return Status::Ok();

  struct Shared {
    std::mutex mu;
    std::condition_variable cv;
    unsigned running = 0;   // guarded by mu
    Status first_error;     // guarded by mu
    std::atomic<std::size_t> next{0};
    std::atomic<bool> failed{false};
  } shared;

  auto work = [&] {
    for (;;) {
      if (shared.failed.load(std::memory_order_relaxed)) break;
      if (cancel.load(std::memory_order_relaxed)) {
        std::lock_guard lock(shared.mu);
        if (shared.first_error.ok()) shared.first_error = Unavailable("load of model '" + model.name + "' cancelled", "loader.cancelled");
        shared.failed = true;
        break;
      }
      std::size_t i = shared.next.fetch_add(1, std::memory_order_relaxed);
      if (i >= chunks.size()) break;
      const Chunk& c = chunks[i];
      ResidentShard& shard = model.shards[c.shard];
      std::span<std::byte> dst(shard.segment.data() + c.offset, c.size);
      Status s = posix::PreadFull(fds[c.shard].get(), dst, shard.header.data_offset + c.offset,
                                  model.dir + "/" + shard.file);
      if (!s.ok()) {
        std::lock_guard lock(shared.mu);
        if (shared.first_error.ok()) shared.first_error = s;
        shared.failed = true;
        break;
      }
      bytes_read_.fetch_add(c.size, std::memory_order_relaxed);
    }
    std::lock_guard lock(shared.mu);
    if (--shared.running == 0) shared.cv.notify_all();
  };

  const unsigned n = static_cast<unsigned>(std::min<std::size_t>(readers_.size(), chunks.size()));
  {
    std::lock_guard lock(shared.mu);
    shared.running = n;
  }
  for (unsigned t = 0; t < n; ++t) {
    if (!readers_.Submit(work)) {
      std::lock_guard lock(shared.mu);
      shared.running -= (n - t);
      if (shared.first_error.ok()) shared.first_error = Unavailable("the daemon is shutting down", "loader.closed");
      break;
    }
  }
  std::unique_lock lock(shared.mu);
  shared.cv.wait(lock, [&] { return shared.running == 0; });
  return shared.first_error;
}

}  // namespace weightd

#include "adopt.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <sstream>
#include <thread>

#include "catalog.h"

namespace weightd {
namespace {

Status BadRecord(const std::string& name, const std::string& why) {
  return DataLoss("adoption record /" + name + ": " + why, "adopt.bad_record");
}

Status Changed(const ModelRecord& r, const std::string& why) {
  return FailedPrecondition("model '" + r.model + "' (record /" + r.name + "): " + why, "adopt.model_changed");
}

}  // namespace

ModelRecord RecordOf(const ResidentModel& model, const std::string& name, std::uint64_t generation) {
  ModelRecord r;
  r.name = name;
  r.model = model.name;
  r.dir = model.dir;
  r.generation = generation;
  for (const ResidentShard& sh : model.shards) {
    ModelRecord::Shard s;
    s.file = sh.file;
    s.segment = sh.segment.name();
    s.data_size = sh.segment.data_size();
    s.file_info = sh.file_info;
    s.checksum = sh.checksum;
    s.header_bytes.assign(reinterpret_cast<const char*>(sh.header_bytes.data()), sh.header_bytes.size());
    r.shards.push_back(std::move(s));
  }
  return r;
}

Result<std::shared_ptr<ResidentModel>> Adopt(const ModelRecord& record, const ModelConfig& mc, const SegmentStore& store,
                                             bool verify_manifest, unsigned threads) {
  if (record.model != mc.name || record.dir != mc.dir)
    return Changed(record, "the catalog now says directory " + mc.dir + ", the record " + record.dir);
  // The files must be those that were read: same set, and each with the same identity
  // (the change time too: a rewrite that keeps size and mtime still moves it).
  ASSIGN_OR_RETURN(std::vector<std::string> files, DiscoverShards(mc.dir));
  std::vector<std::string> recorded;
  for (const auto& s : record.shards) recorded.push_back(s.file);
  if (files != recorded) return Changed(record, "its shard files are not those that were loaded");

  auto model = std::make_shared<ResidentModel>();
  model->name = mc.name;
  model->dir = mc.dir;
  model->record = record.name;
  std::vector<st::Header> headers;
  for (const ModelRecord::Shard& s : record.shards) {
    const std::string path = mc.dir + "/" + s.file;
    auto now = posix::StatPath(path);
    if (!now.ok()) return Changed(record, now.status().message());
    const posix::FileInfo& was = s.file_info;
    if (now->size != was.size || now->mtime_ns != was.mtime_ns || now->ctime_ns != was.ctime_ns ||
        now->inode != was.inode || now->dev != was.dev)
      return Changed(record, path + " changed since it was loaded");
    // The header, from the record's copy of its bytes.
    const std::string& hb = s.header_bytes;
    std::uint64_t n = 0;
    if (hb.size() < 8) return BadRecord(record.name, "a header of " + std::to_string(hb.size()) + " bytes");
    std::memcpy(&n, hb.data(), 8);
    if (n != hb.size() - 8) return BadRecord(record.name, "a header whose length prefix disagrees with it");
    auto header = st::ParseHeader(std::string_view(hb).substr(8), was.size);
    if (!header.ok()) return header.status().WithContext("adoption record /" + record.name + ", " + s.file);
    if (header->data_size != s.data_size)
      return BadRecord(record.name, s.file + ": its header says " + std::to_string(header->data_size) +
                                        " data bytes, the record " + std::to_string(s.data_size));
    ResidentShard shard;
    shard.file = s.file;
    shard.header = *header;
    shard.file_info = *now;
    shard.checksum = s.checksum;
    shard.header_bytes.resize(hb.size());
    std::memcpy(shard.header_bytes.data(), hb.data(), hb.size());
    ASSIGN_OR_RETURN(shard.segment, store.Open(s.segment, s.data_size));
    headers.push_back(std::move(header).value());
    model->bytes += s.data_size;
    model->tensor_count += static_cast<std::uint32_t>(headers.back().tensors.size());
    model->shards.push_back(std::move(shard));
  }
  RETURN_IF_ERROR(CheckShardSet(mc.dir, files, headers));
  // The manifest as it is today, as a load would read it.
  if (verify_manifest) {
    ASSIGN_OR_RETURN(auto manifest, ReadManifest(mc.dir));
    for (ResidentShard& sh : model->shards) {
      if (!manifest) continue;
      auto it = manifest->find(sh.file);
      if (it == manifest->end() || !XXH128_isEqual(it->second, sh.checksum))
        return Changed(record, mc.dir + "/" + std::string(kChecksumManifest) + " does not vouch for " + sh.file);
      sh.verified = true;
    }
  }

  // Hash header + segment data per shard, `threads` shards at a time.
  enum : char { kUnhashed, kMatches, kDiffers };
  std::vector<char> verdict(model->shards.size(), kUnhashed);
  std::atomic<std::size_t> next{0};
  auto work = [&] {
    for (std::size_t i; (i = next.fetch_add(1)) < model->shards.size();) {
      const ResidentShard& sh = model->shards[i];
      XXH3_state_t* st = XXH3_createState();
      if (st == nullptr) continue;  // stays kUnhashed
      XXH3_128bits_reset(st);
      XXH3_128bits_update(st, sh.header_bytes.data(), sh.header_bytes.size());
      if (sh.segment.data_size() > 0) XXH3_128bits_update(st, sh.segment.data(), sh.segment.data_size());
      verdict[i] = XXH128_isEqual(XXH3_128bits_digest(st), sh.checksum) ? kMatches : kDiffers;
      XXH3_freeState(st);
    }
  };
  {
    std::vector<std::jthread> pool;
    const unsigned n = std::max(1u, std::min<unsigned>(threads, static_cast<unsigned>(model->shards.size())));
    for (unsigned t = 1; t < n; ++t) pool.emplace_back(work);
    work();
  }
  for (std::size_t i = 0; i < verdict.size(); ++i)
    if (verdict[i] == kUnhashed)
      return ResourceExhausted("no memory for the hash state of " + model->shards[i].file, "adopt.no_memory");
    else if (verdict[i] == kDiffers)
      return DataLoss("model '" + mc.name + "': segment /" + model->shards[i].segment.name() + " does not hash to " +
                          model->shards[i].checksum_hex() + ", the checksum of " + model->shards[i].file,
                      "adopt.checksum_mismatch");
  return model;
}

}  // namespace weightd

#include "adopt.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <charconv>
#include <cstdlib>
#include <cstring>
#include <map>
#include <set>
#include <thread>
#include <tuple>

#include <spdlog/spdlog.h>
#include <systemd/sd-daemon.h>

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
    s.part_size = sh.segment.part_size();
    s.file_info = sh.file_info;
    s.checksum = sh.checksum;
    s.block_checksum = sh.block_checksum;
    s.header_bytes.assign(reinterpret_cast<const char*>(sh.header_bytes.data()), sh.header_bytes.size());
    r.shards.push_back(std::move(s));
  }
  return r;
}

ModelRecord PlannedRecord(const LoadPlan& plan, const SegmentStore& store, const std::string& model,
                          std::uint64_t generation) {
  ModelRecord r;
  r.name = store.RecordName(model, generation);
  r.model = model;
  r.dir = plan.dir;
  r.generation = generation;
  for (std::size_t i = 0; i < plan.shards.size(); ++i) {
    const PlannedShard& p = plan.shards[i];
    ModelRecord::Shard s;
    s.file = p.file;
    s.segment = store.SegmentName(model, generation, i);
    s.data_size = p.header.data_size;
    s.part_size = store.PartSize(plan.bytes);
    s.header_bytes.assign(reinterpret_cast<const char*>(p.header_bytes.data()), p.header_bytes.size());
    r.shards.push_back(std::move(s));
  }
  return r;
}

Result<std::shared_ptr<ResidentModel>> Adopt(const ModelRecord& record, const ModelConfig& mc, Loader& loader,
                                             const SegmentStore& store) {
  if (record.model != mc.name || record.dir != mc.dir)
    return Changed(record, "the catalog now says directory " + mc.dir + ", the record " + record.dir);
  // The files as a load would find them now: the shard set, each file's identity and header,
  // and (when the loader verifies) the checksums today's manifest names. No data is read.
  auto plan = loader.Plan(mc);
  if (!plan.ok()) return Changed(record, plan.status().message());
  std::vector<std::string> files, recorded;
  for (const PlannedShard& p : plan->shards) files.push_back(p.file);
  for (const auto& s : record.shards) recorded.push_back(s.file);
  if (files != recorded) return Changed(record, "its shard files are not those that were loaded");

  auto model = std::make_shared<ResidentModel>();
  model->name = mc.name;
  model->dir = mc.dir;
  model->record = record.name;
  model->record_bytes = SegmentStore::RecordBytes(record);
  for (std::size_t i = 0; i < record.shards.size(); ++i) {
    const ModelRecord::Shard& s = record.shards[i];
    PlannedShard& p = plan->shards[i];
    const std::string path = mc.dir + "/" + s.file;
    if (!SameFile(s.file_info, p.file_info)) return Changed(record, path + " changed since it was loaded");
    const std::string_view header(reinterpret_cast<const char*>(p.header_bytes.data()), p.header_bytes.size());
    if (header != s.header_bytes) return BadRecord(record.name, s.file + ": its header is not the file's");
    if (p.header.data_size != s.data_size)
      return BadRecord(record.name, s.file + ": its header says " + std::to_string(p.header.data_size) +
                                        " data bytes, the record " + std::to_string(s.data_size));
    if (p.expected && (s.block_checksum || !XXH128_isEqual(*p.expected, s.checksum)))
      return Changed(record, mc.dir + "/" + std::string(kChecksumManifest) + " does not vouch for " + s.file);
    ResidentShard shard;
    shard.file = s.file;
    shard.header = std::move(p.header);
    shard.file_info = p.file_info;
    shard.checksum = s.checksum;
    shard.block_checksum = s.block_checksum;
    shard.verified = p.expected.has_value();
    shard.header_bytes = std::move(p.header_bytes);
    ASSIGN_OR_RETURN(shard.segment, store.Open(s.segment, s.data_size, s.part_size));
    shard.segment.CloseFds();  // the mapping is what the daemon keeps
    model->bytes += s.data_size;
    model->tensor_count += static_cast<std::uint32_t>(shard.header.tensors.size());
    model->shards.push_back(std::move(shard));
  }
  // Only segments whose bytes hash to the file's checksum are taken back.
  ASSIGN_OR_RETURN(std::vector<XXH128_hash_t> sums, loader.Checksums(*model));
  for (std::size_t i = 0; i < sums.size(); ++i)
    if (!XXH128_isEqual(sums[i], model->shards[i].checksum))
      return DataLoss("model '" + mc.name + "': segment /" + model->shards[i].segment.name() + " does not hash to " +
                          model->shards[i].checksum_hex() + ", the checksum of " + model->shards[i].file,
                      "adopt.checksum_mismatch");
  return model;
}

std::size_t AdoptHostCopies(const DaemonConfig& config, const SegmentStore& store, Loader& loader, ModelTable& table,
                            Cache& cache, Loads& loads) {
  SegmentStore::Listing names = store.List();
  if (names.foreign > 0)
    spdlog::warn("{} names under /dev/shm/{}.* are not this daemon's own files; left alone", names.foreign,
                 config.shm_prefix);
  std::vector<ModelRecord> records;
  for (const std::string& name : names.own) {
    if (!SegmentStore::IsRecordName(name)) continue;
    auto record = store.ReadRecord(name);
    if (!record.ok()) {
      spdlog::warn("not adopting: {}", record.status().ToString());
      continue;
    }
    if (table.Find(record->model) == nullptr) {
      spdlog::info("not adopting model '{}' of the previous instance: it is no longer in the catalog", record->model);
      continue;
    }
    records.push_back(std::move(record).value());
  }
  std::sort(records.begin(), records.end(), [&](const ModelRecord& a, const ModelRecord& b) {
    const int pa = table.Find(a.model)->config.priority, pb = table.Find(b.model)->config.priority;
    return pa != pb ? pa > pb : a.generation > b.generation;
  });
  std::set<std::string> keep;
  std::size_t adopted = 0;
  for (const ModelRecord& record : records) {
    ModelEntry& m = *table.Find(record.model);
    if (m.resident) continue;  // a newer record of the model was adopted
    const auto t0 = std::chrono::steady_clock::now();
    const std::uint64_t bytes = SegmentStore::HostCharge(record);
    if (!cache.HasRoomForHost(bytes)) {
      spdlog::info("not adopting model '{}' ({}): no room under the host budget {} or max_host_models", record.model,
                   Gib(bytes), Gib(cache.host_budget()));
      continue;
    }
    auto r = Adopt(record, m.config, loader, store);
    if (!r.ok()) {
      spdlog::warn("not adopting model '{}' of the previous instance: {}", record.model, r.status().ToString());
      continue;
    }
    std::vector<std::string> files, shm_paths;
    std::vector<st::Header> headers;
    std::uint64_t part_size = 0;  // the same for every shard of a copy, or 0 where one part holds a shard
    m.shard_sizes.clear();
    for (const ResidentShard& sh : (*r)->shards) {
      files.push_back(sh.file);
      headers.push_back(sh.header);
      shm_paths.push_back(sh.segment.shm_path());
      m.shard_sizes.push_back(sh.header.data_size);
      part_size = std::max(part_size, sh.segment.part_size());
      for (const std::string& part : sh.segment.part_names()) keep.insert(part);
    }
    keep.insert(record.name);
    m.generation = record.generation;
    table.SawGeneration(record.generation);
    m.host_bytes = bytes;
    table.BuildIndex(m, files, headers, shm_paths, part_size);
    table.InstallHost(m, std::move(r).value());
    ++adopted;
    spdlog::info("model '{}' adopted from the previous instance: {} shards, {} verified in {} ms, nothing read from disk",
                 m.config.name, m.resident->shards.size(), Gib(m.resident->bytes),
                 ToMs(std::chrono::steady_clock::now() - t0));
    loads.StartPin(m);
  }
  if (const std::size_t removed = store.RemoveLeftovers(names.own, keep); removed > 0)
    spdlog::warn("removed {} segments of an earlier instance under prefix '{}' that were not adopted", removed,
                 config.shm_prefix);
  return adopted;
}

// ---- GPU copies in systemd's fd store ----

namespace {

bool ParseU64(std::string_view s, std::uint64_t* out) {
  const auto [end, ec] = std::from_chars(s.data(), s.data() + s.size(), *out);
  return !s.empty() && ec == std::errc() && end == s.data() + s.size();
}

std::string FdStoreName(const std::string& uuid, std::uint64_t host_generation, std::size_t shard,
                        const std::string& model) {
  return "gpu." + uuid + "." + std::to_string(host_generation) + "." + std::to_string(shard) + "." + model;
}

}  // namespace

StoredCopy::~StoredCopy() {
  for (const std::string& n : names) sd_notify(0, ("FDSTOREREMOVE=1\nFDNAME=" + n).c_str());
}

// sd_notify goes to a service manager that keeps fds for us.
bool GpuFdStore::Enabled() const {
  return wanted_ && mode_ == gpu::ExportMode::kVmm && std::getenv("NOTIFY_SOCKET") != nullptr;
}

void GpuFdStore::Store(const ModelEntry& m, GpuEntry& g) {
  if (!Enabled() || !g.copy || !m.resident) return;
  auto fds = g.copy->ExportFds();
  if (!fds.ok()) {
    spdlog::warn("model '{}': not storing its copy on {} with systemd: {}", m.config.name, CudaName(g.copy->ordinal()),
                 fds.status().ToString());
    return;
  }
  auto stored = std::make_shared<StoredCopy>();
  for (std::size_t i = 0; i < fds->size(); ++i) {
    const std::string name = FdStoreName(g.copy->device_uuid(), m.generation, i, m.config.name);
    const int fd = (*fds)[i].get();
    const int r = sd_pid_notify_with_fds(0, 0, ("FDSTORE=1\nFDNAME=" + name).c_str(), &fd, 1);
    if (r <= 0) {
      spdlog::warn("model '{}': systemd did not take the fds of its copy on {} ({}); it is made again after a crash",
                   m.config.name, CudaName(g.copy->ordinal()), r < 0 ? std::strerror(-r) : "no service manager");
      return;  // `stored` removes what was sent
    }
    stored->names.push_back(name);
  }
  g.stored = std::move(stored);
}

void GpuFdStore::AdoptStored(ModelTable& table) {
  char** raw_names = nullptr;
  const int n = sd_listen_fds_with_names(1, &raw_names);
  if (n <= 0) return;
  struct Group {
    std::map<std::size_t, posix::Fd> fds;
    std::vector<std::string> names;
  };
  std::map<std::tuple<std::string, std::string, std::uint64_t>, Group> groups;  // model, uuid, generation
  std::vector<std::string> dropped;
  for (int i = 0; i < n; ++i) {
    posix::Fd fd(SD_LISTEN_FDS_START + i);
    ::fcntl(fd.get(), F_SETFD, FD_CLOEXEC);
    std::string name = raw_names != nullptr && raw_names[i] != nullptr ? raw_names[i] : "";
    // gpu.<uuid>.<generation>.<shard>.<model>; the uuid has no '.', the model may.
    std::vector<std::string> f;
    std::size_t from = 0;
    for (int k = 0; k < 4 && from != std::string::npos; ++k) {
      const std::size_t dot = name.find('.', from);
      f.push_back(name.substr(from, dot == std::string::npos ? std::string::npos : dot - from));
      from = dot == std::string::npos ? dot : dot + 1;
    }
    std::uint64_t gen = 0, shard = 0;
    if (f.size() != 4 || f[0] != "gpu" || from == std::string::npos || !ParseU64(f[2], &gen) || !ParseU64(f[3], &shard)) {
      spdlog::warn("systemd passed fd {} named '{}', which is not a GPU copy of weightd's; closing it", fd.get(), name);
      if (!name.empty()) dropped.push_back(name);
      continue;
    }
    Group& grp = groups[{name.substr(from), f[1], gen}];
    grp.fds[static_cast<std::size_t>(shard)] = std::move(fd);
    grp.names.push_back(name);
  }
  if (raw_names != nullptr) {
    for (int i = 0; i < n; ++i) std::free(raw_names[i]);
    std::free(raw_names);
  }
  const bool serving = gpu_ != nullptr && gpu_->available() && mode_ == gpu::ExportMode::kVmm;
  for (auto& entry : groups) {
    // Named, not structured bindings: clang 14 (scripts/thread-safety.sh) cannot capture those.
    const std::string& model = std::get<0>(entry.first);
    const std::string& uuid = std::get<1>(entry.first);
    const std::uint64_t gen = std::get<2>(entry.first);
    Group& grp = entry.second;
    const auto t0 = std::chrono::steady_clock::now();
    auto why_not = [&]() -> Status {
      ModelEntry* m = table.Find(model);
      if (m == nullptr || !m->resident || m->generation != gen)
        return FailedPrecondition("its host copy (generation " + std::to_string(gen) + ") was not adopted", "adopt.no_host_copy");
      if (!serving) return FailedPrecondition("this instance serves no VMM GPU copies", "adopt.no_gpu");
      ASSIGN_OR_RETURN(int ordinal, gpu_->ResolveDevice(uuid));
      const auto& shards = m->resident->shards;
      if (grp.fds.size() != shards.size() || grp.fds.rbegin()->first != shards.size() - 1)
        return FailedPrecondition(std::to_string(grp.fds.size()) + " stored fds for " + std::to_string(shards.size()) +
                                      " shards", "adopt.gpu_incomplete");
      std::vector<int> fds;
      std::vector<std::uint64_t> sizes;
      for (const auto& [i, fd] : grp.fds) {
        fds.push_back(fd.get());
        sizes.push_back(shards[i].segment.data_size());
      }
      ASSIGN_OR_RETURN(std::shared_ptr<gpu::GpuCopy> copy, gpu_->Adopt(ordinal, fds, sizes));
      // Every byte, against the verified host copy.
      std::vector<std::byte> buf(std::size_t{64} << 20);
      for (std::size_t i = 0; i < shards.size(); ++i)
        for (std::uint64_t off = 0; off < shards[i].segment.data_size(); off += buf.size()) {
          const std::size_t len = static_cast<std::size_t>(std::min<std::uint64_t>(buf.size(), shards[i].segment.data_size() - off));
          RETURN_IF_ERROR(copy->CopyToHost(i, off, std::span(buf.data(), len)));
          if (std::memcmp(buf.data(), shards[i].segment.data() + off, len) != 0)
            return DataLoss("shard " + std::to_string(i) + " differs from the host copy at byte " + std::to_string(off),
                            "adopt.gpu_mismatch");
        }
      GpuEntry& g = m->gpus[ordinal];
      g.state = ModelState::kResident;
      g.phase = Phase::kIdle;
      g.copy = std::move(copy);
      g.generation = table.NextGeneration();
      g.last_used = clock_->Now();
      g.stored = std::make_shared<StoredCopy>();
      g.stored->names = grp.names;
      spdlog::info("model '{}': its copy on {} adopted from systemd's fd store, verified in {} ms", model,
                   CudaName(ordinal), ToMs(std::chrono::steady_clock::now() - t0));
      return Status::Ok();
    }();
    if (!why_not.ok()) {
      spdlog::warn("model '{}': not adopting its stored copy on {}: {}", model, uuid, why_not.ToString());
      dropped.insert(dropped.end(), grp.names.begin(), grp.names.end());
    }
  }
  for (const std::string& name : dropped) sd_notify(0, ("FDSTOREREMOVE=1\nFDNAME=" + name).c_str());
}

}  // namespace weightd

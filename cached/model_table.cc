#include "model_table.h"

#include <cstdio>
#include <set>

#include <spdlog/spdlog.h>

namespace weightd {

std::string CudaName(int ordinal) { return "cuda:" + std::to_string(ordinal); }

std::string Gib(std::uint64_t b) {
  char buf[32];
  if (b < (1ull << 20)) std::snprintf(buf, sizeof buf, "%.1f KiB", static_cast<double>(b) / 1024);
  else if (b < (1ull << 30)) std::snprintf(buf, sizeof buf, "%.1f MiB", static_cast<double>(b) / (1ull << 20));
  else std::snprintf(buf, sizeof buf, "%.2f GiB", static_cast<double>(b) / (1ull << 30));
  return buf;
}

std::uint64_t ToMs(Clock::TimePoint::duration d) {
  return static_cast<std::uint64_t>(std::chrono::duration_cast<std::chrono::milliseconds>(d).count());
}

ModelTable::ModelTable(const Clock* clock, Counters* counters, std::size_t gpu_devices, LoopPost post)
    : clock_(clock),
      counters_(counters),
      post_(std::move(post)),
      reaping_gpu_(std::make_unique<std::atomic<std::uint64_t>[]>(std::max<std::size_t>(1, gpu_devices))) {}

ModelEntry* ModelTable::Find(const std::string& name) {
  auto it = models_.find(name);
  return it == models_.end() ? nullptr : &it->second;
}

const ModelEntry* ModelTable::Find(const std::string& name) const {
  auto it = models_.find(name);
  return it == models_.end() ? nullptr : &it->second;
}

void ModelTable::InstallHost(ModelEntry& m, std::shared_ptr<ResidentModel> r) {
  m.state = ModelState::kResident;
  m.last_used = clock_->Now();
  // What the copies were made from, kept while any tier holds one (no segments, no headers).
  auto fingerprint = std::make_shared<ResidentModel>();
  fingerprint->name = r->name;
  fingerprint->dir = r->dir;
  for (const ResidentShard& sh : r->shards) {
    ResidentShard f;
    f.file = sh.file;
    f.file_info = sh.file_info;
    fingerprint->shards.push_back(std::move(f));
  }
  m.files = std::move(fingerprint);
  m.resident = std::move(r);
}

void ModelTable::BuildIndex(ModelEntry& m, const std::vector<std::string>& files, const std::vector<st::Header>& headers,
                            const std::vector<std::string>& shm_paths, std::uint64_t part_size) {
  m.segments.clear();
  m.tensors.clear();
  m.tensor_index.clear();
  for (std::size_t i = 0; i < headers.size(); ++i) {
    const st::Header& h = headers[i];
    const std::uint64_t size = posix::RoundUp(h.data_size, posix::PageSize());
    m.segments.push_back(proto::SegmentInfo{shm_paths[i], size, h.data_size, files[i], h.data_offset, 0, {},
                                            part_size < size ? part_size : 0});
    for (const auto& t : h.tensors) {
      m.tensor_index[t.name] = m.tensors.size();
      m.tensors.push_back(proto::TensorRecord{t.name, static_cast<std::uint8_t>(t.dtype), t.shape,
                                              static_cast<std::uint32_t>(i), t.begin, t.nbytes()});
    }
  }
}

Result<Grant> ModelTable::GrantOf(const ModelEntry& m, const std::vector<std::string>& filter, int ordinal) const {
  Grant g;
  proto::Manifest& man = g.manifest;
  man.model = m.config.name;
  man.device = "cpu";
  man.model_dir = m.config.dir;
  // The shards in manifest order, as indices into m.segments.
  if (filter.empty()) {
    man.tensors = m.tensors;
    for (std::uint32_t i = 0; i < m.segments.size(); ++i) g.shards.push_back(i);
  } else {
    std::vector<std::string> unknown;
    std::set<std::size_t> picked;
    for (const auto& n : filter) {
      auto t = m.tensor_index.find(n);
      if (t == m.tensor_index.end()) unknown.push_back(n);
      else picked.insert(t->second);
    }
    if (!unknown.empty()) {
      std::string list;
      for (std::size_t i = 0; i < unknown.size() && i < 10; ++i) list += (i ? ", " : "") + unknown[i];
      if (unknown.size() > 10) list += ", ...";
      return NotFound("model '" + m.config.name + "' has no tensor named " + list, "acquire.unknown_tensor");
    }
    // Only the segments the chosen tensors live in, renumbered.
    std::map<std::uint32_t, std::uint32_t> remap;
    for (std::size_t i : picked) remap.emplace(m.tensors[i].segment, 0);
    for (auto& [old, neu] : remap) {
      neu = static_cast<std::uint32_t>(g.shards.size());
      g.shards.push_back(old);
    }
    for (std::size_t i : picked) {
      man.tensors.push_back(m.tensors[i]);
      man.tensors.back().segment = remap[m.tensors[i].segment];
    }
  }
  if (ordinal >= 0) g.copy = m.gpus.at(ordinal).copy;
  for (std::uint32_t i : g.shards) {
    proto::SegmentInfo seg = m.segments[i];
    if (g.copy) {
      // GPU leases import the device copy and never map the host segment.
      seg.shm_name.clear();
      seg.size = 0;
      seg.gpu_alloc_size = g.copy->shards()[i].alloc_size;
      if (g.copy->mode() == gpu::ExportMode::kLegacy) seg.ipc_handle = g.copy->shards()[i].ipc_handle;
    }
    man.segments.push_back(std::move(seg));
  }
  if (g.copy) {
    man.device = g.copy->device_uuid();
    man.gpu_export = static_cast<std::uint8_t>(g.copy->mode() == gpu::ExportMode::kVmm ? proto::GpuExport::kVmm
                                                                                       : proto::GpuExport::kLegacy);
  }
  return g;
}

void ModelTable::EvictHost(ModelEntry& m, policy::EvictReason why) {
  if (!m.resident) return;
  spdlog::info("evicting model '{}' from the host tier ({} bytes, {})", m.config.name, m.host_bytes, policy::ReasonName(why));
  ++counters_->host.evictions[std::string(policy::ReasonName(why))];
  Dispose(std::move(m.resident), std::move(m.host_pins), /*unlink=*/true);
  m.host_pins.clear();
  m.resident.reset();
  m.pinning = false;
  m.state = ModelState::kAbsent;
  ForgetIndexUnlessHeld(m);
}

void ModelTable::EvictGpu(ModelEntry& m, int ordinal, policy::EvictReason why) {
  auto it = m.gpus.find(ordinal);
  if (it == m.gpus.end()) return;
  if (it->second.copy) {
    spdlog::info("evicting model '{}' from {} ({} bytes, {})", m.config.name, CudaName(ordinal),
                 it->second.copy->allocated_bytes(), policy::ReasonName(why));
    ++counters_->gpu.evictions[std::string(policy::ReasonName(why))];
  }
  // The copy is freed once no lease pins it (none does: only unleased copies are evicted, or
  // leases of a dropped catalog entry, which keep theirs), on the reaper.
  if (it->second.copy) Dispose(nullptr, {}, false, {std::move(it->second.copy)});
  m.gpus.erase(it);
  ForgetIndexUnlessHeld(m);
}

void ModelTable::DropResident(ModelEntry& m) {
  std::vector<std::shared_ptr<gpu::GpuCopy>> copies;
  for (auto& [ordinal, g] : m.gpus)
    if (g.copy) copies.push_back(std::move(g.copy));
  Dispose(std::move(m.resident), std::move(m.host_pins), /*unlink=*/true, std::move(copies));
  m.host_pins.clear();
  m.resident.reset();
  m.pinning = false;
  m.files.reset();
  m.shard_sizes.clear();
  m.plan.reset();
  m.progress.reset();
  m.host_reserved = 0;
  m.phase = Phase::kIdle;
  m.segments.clear();
  m.tensors.clear();
  m.tensor_index.clear();
  m.gpus.clear();
}

void ModelTable::ForgetIndexUnlessHeld(ModelEntry& m) {
  if (m.resident || !m.gpus.empty() || m.state == ModelState::kLoading) return;
  m.segments.clear();
  m.tensors.clear();
  m.tensor_index.clear();
  m.files.reset();
  m.shard_sizes.clear();
}

void ModelTable::Touch(const std::string& model, const std::string& device, Clock::TimePoint now) {
  ModelEntry* m = Find(model);
  if (m == nullptr) return;
  if (device == "cpu") m->last_used = now;
  for (auto& [ordinal, g] : m->gpus)
    if (CudaName(ordinal) == device) g.last_used = now;
}

std::uint64_t ModelTable::HostUsed() const {
  std::uint64_t used = 0;
  for (const auto& [name, m] : models_) used += (m.resident ? m.host_bytes : 0) + m.host_reserved;
  return used;
}

std::size_t ModelTable::HostCount() const {
  std::size_t n = 0;
  for (const auto& [name, m] : models_) n += (m.resident || m.host_reserved > 0) ? 1 : 0;
  return n;
}

std::uint64_t ModelTable::GpuUsed(int ordinal) const {
  std::uint64_t used = 0;
  for (const auto& [name, m] : models_) {
    auto g = m.gpus.find(ordinal);
    if (g != m.gpus.end()) used += (g->second.copy ? g->second.copy->allocated_bytes() : 0) + g->second.reserved;
  }
  return used;
}

std::size_t ModelTable::GpuCount(int ordinal) const {
  std::size_t n = 0;
  for (const auto& [name, m] : models_) {
    auto g = m.gpus.find(ordinal);
    if (g != m.gpus.end() && (g->second.copy || g->second.reserved > 0)) ++n;
  }
  return n;
}

void ModelTable::Dispose(std::shared_ptr<const ResidentModel> host, std::vector<std::shared_ptr<const void>> pins,
                         bool unlink, std::vector<std::shared_ptr<gpu::GpuCopy>> gpu_copies) {
  // Until the reaper has freed them, the budgets count these bytes (cache.h).
  std::uint64_t host_bytes = 0;
  if (host && unlink) {
    for (const ResidentShard& sh : host->shards) host_bytes += sh.segment.mapped_size();
    if (!host->record.empty()) host_bytes += posix::RoundUp(host->record_bytes, posix::PageSize());
  }
  std::vector<std::pair<int, std::uint64_t>> gpu_bytes;
  for (const auto& c : gpu_copies) gpu_bytes.emplace_back(c->ordinal(), c->allocated_bytes());
  reaping_host_ += host_bytes;
  for (auto [ordinal, bytes] : gpu_bytes) reaping_gpu_[static_cast<std::size_t>(ordinal)] += bytes;
  auto job = [this, h = std::move(host), p = std::move(pins), unlink, g = std::move(gpu_copies), host_bytes,
              gpu_bytes]() mutable {
    p.clear();
    if (h && unlink) h->RemoveSegments();
    h.reset();
    g.clear();
    reaping_host_ -= host_bytes;
    for (auto [ordinal, bytes] : gpu_bytes) reaping_gpu_[static_cast<std::size_t>(ordinal)] -= bytes;
    // Memory came back: the loop retries the admissions that wait for it.
    if (host_bytes > 0 || !gpu_bytes.empty()) post_([] {});
  };
  if (!reaper_.Submit(job)) job();
}

void ModelTable::RemoveSegments(bool keep_adoptable) {
  for (auto& [name, m] : models_)
    if (m.resident && !(keep_adoptable && !m.resident->record.empty())) m.resident->RemoveSegments();
}

}  // namespace weightd

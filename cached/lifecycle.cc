#include "lifecycle.h"

#include <unistd.h>

#include <algorithm>

#include <spdlog/spdlog.h>

#include "adopt.h"

namespace weightd {

Lifecycle::Lifecycle(const DaemonConfig& config, const Clock* clock, Clock::TimePoint started, gid_t shm_gid,
                     ModelTable& table, Cache& cache, Loads& loads, const LeaseTable& leases, Loader& loader,
                     const SegmentStore& store,
                     gpu::GpuTier* gpu, GpuFdStore* fd_store, Counters& counters, ModelEvents& events, LoopPost post)
    : config_(config),
      clock_(clock),
      started_(started),
      shm_gid_(shm_gid),
      table_(table),
      cache_(cache),
      loads_(loads),
      leases_(leases),
      loader_(loader),
      store_(store),
      gpu_(gpu),
      fd_store_(fd_store),
      counters_(counters),
      events_(events),
      post_(std::move(post)) {}

void Lifecycle::Start() {
  ApplyCatalog(config_.models);
  counters_.adopted_models += AdoptHostCopies(config_, store_, loader_, table_, cache_, loads_);
  if (fd_store_ != nullptr) fd_store_->AdoptStored(table_);
  for (auto& [name, m] : table_.models()) StartPreloads(m, true);
  if (!preloads_.empty()) events_.Notify("STATUS=preloading " + std::to_string(preloads_.size()) + " copies");
}

void Lifecycle::Reload(auth::Policy* policy) {
  if (!config_.config_path) {
    spdlog::info("SIGHUP: no config file in use; the catalog is unchanged");
    return;
  }
  DaemonConfig next;
  Status s = ApplyTomlFile(*config_.config_path, &next);
  if (!s.ok()) {
    spdlog::error("SIGHUP: keeping the current catalog: {}", s.ToString());
    return;
  }
  // Models given on the command line stay, and win over the file.
  std::vector<ModelConfig> merged = next.models;
  for (const auto& m : config_.cli_models) {
    auto it = std::find_if(merged.begin(), merged.end(), [&](const ModelConfig& x) { return x.name == m.name; });
    if (it != merged.end()) *it = m;
    else merged.push_back(m);
  }
  // The ACLs come with the models; the groups they name are looked up again.
  DaemonConfig acl_config = config_;
  acl_config.models = merged;
  auto next_policy = auth::Policy::Create(acl_config, ::geteuid(), ::getegid());
  if (next_policy.ok()) s = auth::CheckSegmentGroup(*next_policy, shm_gid_, config_.shm_mode);
  if (!next_policy.ok() || !s.ok()) {
    spdlog::error("SIGHUP: keeping the current catalog: {}", (next_policy.ok() ? s : next_policy.status()).ToString());
    return;
  }
  *policy = std::move(next_policy).value();
  const CatalogDiff diff = ApplyCatalog(merged);
  // Preloads of models the reload added or changed. Readiness counts only the configuration the
  // daemon started with.
  for (const auto& list : {diff.added, diff.updated, diff.changed})
    for (const auto& name : list) StartPreloads(table_.Get(name), false);
  events_.Notify("STATUS=catalog reloaded: " + std::to_string(catalog_.models().size()) + " models");
}

CatalogDiff Lifecycle::ApplyCatalog(const std::vector<ModelConfig>& list) {
  CatalogDiff diff = catalog_.Update(list);
  auto drop = [&](const std::string& name, const char* why) {
    ModelEntry* m = table_.Find(name);
    if (m == nullptr) return;
    if (m->cancel) m->cancel->store(true);
    const Status changed = Unavailable("model '" + name + "' " + why + " while loading", "catalog.changed");
    events_.Refuse(m->waiters, changed);
    events_.Refuse(m->pin_waiters, changed);
    for (auto& [ordinal, g] : m->gpus) events_.Refuse(g.waiters, changed);
    // Clients that still map the old segments keep them; leased GPU copies stay pinned by their
    // leases; new requests get the new catalog.
    table_.DropResident(*m);
    cache_.Forget(name);
  };
  for (const auto& name : diff.removed) {
    drop(name, "was removed from the catalog");
    table_.Erase(name);
    spdlog::info("model '{}' removed from the catalog", name);
  }
  for (const auto& name : diff.changed) {
    drop(name, "changed directory");
    ModelEntry& m = table_.Get(name);
    m.config = *catalog_.Find(name);
    m.state = ModelState::kAbsent;
    m.generation = 0;
    m.last_error = Status::Ok();
    spdlog::info("model '{}' now served from {}", name, m.config.dir);
  }
  for (const auto& name : diff.updated) {
    table_.Get(name).config = *catalog_.Find(name);
    spdlog::info("model '{}': new policy settings", name);
  }
  for (const auto& name : diff.added) {
    ModelEntry& m = table_.Get(name);
    m.config = *catalog_.Find(name);
    spdlog::info("model '{}' added to the catalog ({})", name, m.config.dir);
  }
  cache_.RetrySoon();
  return diff;
}

void Lifecycle::StartPreloads(ModelEntry& m, bool for_readiness) {
  for (const std::string& tier : m.config.preload) {
    const std::string key = m.config.name + "/" + tier;
    if (tier == "host") {
      if (for_readiness) {
        preloads_.insert(key);
        m.preload_host = true;
      }
      if (m.state != ModelState::kLoading && m.state != ModelState::kResident) loads_.StartLoad(m);
      else if (m.state == ModelState::kResident && for_readiness) PreloadDone(key, Status::Ok());
      continue;
    }
    auto ordinal = gpu_ != nullptr ? gpu_->ResolveDevice(tier) : Result<int>(Unavailable("no GPU tier", "gpu.no_device"));
    if (!ordinal.ok()) {
      spdlog::error("model '{}': cannot preload '{}': {}", m.config.name, tier, ordinal.status().ToString());
      if (for_readiness) preload_failures_.push_back(key);
      continue;
    }
    const std::string device_key = m.config.name + "/" + CudaName(*ordinal);
    if (for_readiness) {
      preloads_.insert(device_key);
      m.gpus[*ordinal].preload = true;
    }
    loads_.RequestGpu(m, *ordinal);
  }
}

void Lifecycle::PreloadDone(const std::string& key, const Status& s) {
  if (preloads_.erase(key) == 0) return;
  if (!s.ok()) {
    preload_failures_.push_back(key);
    spdlog::error("preload of {} failed: {}", key, s.ToString());
  }
  if (!ready_)
    events_.Notify("STATUS=preloading: " + std::to_string(preloads_.size()) + " left, " +
                   std::to_string(preload_failures_.size()) + " failed");
  MaybeReady();
}

// READY=1 once every preload has finished. A failed preload does not hold the service back
// (a corrupt file would otherwise make systemd restart it forever); it is logged, counted in
// weightd_preload_failures and named in STATUS.
void Lifecycle::MaybeReady() {
  if (ready_ || !preloads_.empty()) return;
  ready_ = true;
  ready_at_ = clock_->Now();
  spdlog::info("ready in {} ms{}", ToMs(ready_at_ - started_),
               preload_failures_.empty() ? "" : " (" + std::to_string(preload_failures_.size()) + " preloads failed)");
  events_.Notify("READY=1\nSTATUS=" + ServingStatus());
}

// The failed preloads stay in every later STATUS=, not only the first one after READY=1.
std::string Lifecycle::ServingStatus() const {
  std::string status = "serving " + std::to_string(catalog_.models().size()) + " models, " +
                       std::to_string(leases_.lease_count()) + " leases";
  if (!preload_failures_.empty()) {
    status += "; failed preloads:";
    for (const auto& k : preload_failures_) status += " " + k;
  }
  return status;
}

// Resident copies of files that changed on disk must not be served: checked on a worker (stat
// can block on a slow filesystem), acted on here.
void Lifecycle::CheckFiles(Clock::TimePoint now) {
  const auto interval = config_.cache.file_check_interval;
  if (interval.count() <= 0 || checking_ || now - last_check_ < interval) return;
  last_check_ = now;
  std::vector<std::shared_ptr<const ResidentModel>> copies;
  for (const auto& [name, m] : table_.models())
    if (m.files && (m.resident || !m.gpus.empty())) copies.push_back(m.files);
  if (copies.empty()) return;
  checking_ = true;
  bool ok = checker_.Submit([this, copies] {
    std::vector<std::string> changed;
    for (const auto& files : copies) {
      auto c = Loader::Changed(*files);
      if (!c.ok()) spdlog::debug("checking model '{}': {}", files->name, c.status().ToString());
      // A file that cannot be read any more has changed, as far as serving it goes.
      if (!c.ok() || *c) changed.push_back(files->name);
    }
    post_([this, changed] { OnChecked(changed); });
  });
  if (!ok) checking_ = false;
}

void Lifecycle::OnChecked(const std::vector<std::string>& changed) {
  checking_ = false;
  for (const std::string& name : changed) {
    ModelEntry* e = table_.Find(name);
    if (e == nullptr || !e->files) continue;
    ModelEntry& m = *e;
    if (m.state == ModelState::kLoading) continue;  // a host load in flight reads the new files already
    spdlog::warn("model '{}': its files changed on disk; its copies are dropped and the next request loads them again", name);
    if (m.resident) ++counters_.host.evictions["changed"];
    for (const auto& [ordinal, g] : m.gpus)
      if (g.copy) ++counters_.gpu.evictions["changed"];
    // Every tier's copy is stale. Leases keep what they map. Requests waiting for a GPU copy
    // of the old files move to a load of the new ones.
    std::map<int, std::vector<Waiter>> gpu_waiters;
    for (auto& [ordinal, g] : m.gpus)
      if (!g.waiters.empty()) gpu_waiters[ordinal] = std::move(g.waiters);
    table_.DropResident(m);
    cache_.Forget(name);
    m.state = ModelState::kAbsent;
    for (auto& [ordinal, waiters] : gpu_waiters) {
      m.gpus[ordinal].waiters = std::move(waiters);
      loads_.RequestGpu(m, ordinal);
    }
  }
}

}  // namespace weightd
